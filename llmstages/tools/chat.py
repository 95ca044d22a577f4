"""`llmstages chat --model CKPT_OR_HF_DIR`: an interactive multi-turn conversation on stdin.

Design choices:
- Each line read is a user message; the whole conversation so far is
  rendered with the chat template and the reply is sampled through the KV
  cache, streamed to stdout token by token (text is printed once the bytes
  so far decode to whole characters), and stops at the end-of-turn token.
  The reply joins the history as the assistant's message.
- Commands: `/exit` (or end of input) quits, `/reset` forgets the
  conversation, `/system TEXT` sets a system message (kept across /reset).
- When the conversation no longer fits the context with `--max-new-tokens`
  room, the oldest turns are dropped (a note goes to stderr), never the
  system message or the newest user message. Without `--max-new-tokens` a
  reply may take up to 256 tokens but never more than half the context (a
  note says so), so the default works on a model with a short context.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from llmstages.tools import TOOLS
from llmstages.tools.generate import DEFAULT_MAX_NEW_TOKENS, add_sampling_arguments

HELP = TOOLS["chat"].help


class _Streamer:
    """Prints a growing token list as text, holding back bytes of an incomplete character."""

    def __init__(self, tokenizer, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # a multi-byte character is not complete yet
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)


def _fit_context(messages: list[dict], encode, room: int) -> list[dict]:
    """Drop the oldest non-system turns until the prompt leaves `room` tokens of context."""
    messages = list(messages)
    while len(encode(messages)) > room:
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise ValueError("the message alone does not fit the model's context with --max-new-tokens room")
        del messages[first]
        print("[dropped the oldest turn to fit the context]", file=sys.stderr)
    return messages


def reply_budget(requested: int | None, context: int) -> int:
    """New tokens per reply: `requested` if it leaves room for a prompt, else the default capped to half the context."""
    if requested is not None:
        if requested >= context:
            raise ValueError(f"--max-new-tokens {requested} leaves no room in the {context}-token context")
        return requested
    budget = min(DEFAULT_MAX_NEW_TOKENS, context // 2)
    if budget < DEFAULT_MAX_NEW_TOKENS:
        print(f"[max new tokens per reply: {budget}, half the model's {context}-token context]", file=sys.stderr)
    return budget


def chat(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> None:
    import torch

    from llmstages.model.generate import generate_batch
    from llmstages.tools.common import padding_id
    from llmstages.tools.generate import load_for_generation

    model, tokenizer, template = load_for_generation(args)
    stop_ids = {template.stop_token_id(tokenizer), tokenizer.eos_id}
    generator = torch.Generator().manual_seed(args.seed)
    max_new_tokens = reply_budget(args.max_new_tokens, model.config.max_seq_len)
    room = model.config.max_seq_len - max_new_tokens
    system: list[dict] = []
    history: list[dict] = []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = []
            stdout.write("[conversation reset]\n")
            continue
        if text.startswith("/system "):
            system = [{"role": "system", "content": text[len("/system "):]}]
            stdout.write("[system message set]\n")
            continue
        if not text.strip():
            continue
        messages = _fit_context(system + history + [{"role": "user", "content": text}],
                                lambda m: template.encode_prompt(m, tokenizer), room)
        history = messages[len(system):]
        prompt = template.encode_prompt(messages, tokenizer)
        stream = _Streamer(tokenizer, stdout)
        stdout.write("assistant> ")
        generate_batch(
            model, [prompt], max_new_tokens, stop_ids=stop_ids, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, generator=generator, pad_id=padding_id(tokenizer, model), on_token=stream,
        )
        stdout.write(stream.text()[stream.printed:] + "\n")
        stdout.flush()
        history.append({"role": "assistant", "content": stream.text()})


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llmstages chat", description=HELP)
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)
    from llmstages.errors import as_user_error

    with as_user_error(ValueError, FileNotFoundError):
        chat(args, sys.stdin, sys.stdout)
