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
  system message or the newest user message.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from llmstages.checkpointing import CheckpointError

HELP = "interactive multi-turn chat on stdin, streamed, from a .ckpt or a Hugging Face folder"


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


def chat(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> None:
    import torch

    from llmstages.model.generate import generate_batch
    from llmstages.tools.generate import load_for_generation

    model, tokenizer, template = load_for_generation(args)
    stop_ids = {template.stop_token_id(tokenizer), tokenizer.eos_id}
    generator = torch.Generator().manual_seed(args.seed)
    room = model.config.max_seq_len - args.max_new_tokens
    if room < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room in the {model.config.max_seq_len}-token context")
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
            model, [prompt], args.max_new_tokens, stop_ids=stop_ids, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, generator=generator, pad_id=tokenizer.pad_id, on_token=stream,
        )
        stdout.write(stream.text()[stream.printed:] + "\n")
        stdout.flush()
        history.append({"role": "assistant", "content": stream.text()})


def main(argv: list[str]) -> None:
    from llmstages.tools.generate import add_sampling_arguments

    parser = argparse.ArgumentParser(prog="llmstages chat", description=HELP)
    add_sampling_arguments(parser)
    parser.set_defaults(max_new_tokens=256)
    args = parser.parse_args(argv)
    try:
        chat(args, sys.stdin, sys.stdout)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        parser.exit(2, f"llmstages chat: error: {error}\n")
