"""`llmstages generate --model CKPT_OR_HF_DIR (--prompt TEXT ... | --prompts FILE)`: batch replies.

Design choices:
- Each prompt is a conversation (a plain line is one user message; a
  `.jsonl` row has `messages` or `prompt`), rendered with the chat template
  up to the assistant header, unless `--raw` continues the text as it is.
- Replies stop at the template's end-of-turn token (and end-of-text) or after
  the new-token budget; prompts run in batches through the KV cache
  (`generate_batch`), greedy unless `--temperature` > 0.
- The budget: `--max-new-tokens N` exactly, refused when a prompt leaves less
  room in the model's context; without it, up to `DEFAULT_MAX_NEW_TOKENS`,
  capped to what the context leaves after the prompt (a note on stderr says
  so), so the default works on any model, the demo's 256-token one included.
- Output: one block per prompt, or with `--jsonl` one JSON object per line
  (`prompt`, `reply`, `stopped`, `new_tokens`), which scripts and tests read.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmstages.tools import TOOLS

HELP = TOOLS["generate"].help
DEFAULT_MAX_NEW_TOKENS = 256


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "--ckpt", "--hf", dest="model", required=True,
                        help="an llmstages .ckpt or a Hugging Face model folder")
    parser.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the model's, see docs)")
    parser.add_argument("--template", help="chat template: chatml, llama3, plain (default: recorded, else chatml)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"new tokens per reply (default: {DEFAULT_MAX_NEW_TOKENS}, or what the context leaves)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seeds sampling (temperature > 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--cache-dir", help="where the embedded default tokenizer is cached (.cache/llmstages)")


def new_token_budget(requested: int | None, prompt_tokens: int, context: int) -> int:
    """Tokens a reply may add after a prompt of `prompt_tokens`: `requested` exactly, else the default capped."""
    room = context - prompt_tokens
    if requested is not None:
        if requested > room:
            raise ValueError(
                f"--max-new-tokens {requested}: the longest prompt ({prompt_tokens} tokens) plus max_new_tokens="
                f"{requested} exceeds max_seq_len={context}"
            )
        return requested
    if room < 1:
        raise ValueError(f"a prompt of {prompt_tokens} tokens leaves no room in the model's {context}-token context")
    if room < DEFAULT_MAX_NEW_TOKENS:
        print(f"[max new tokens: {room}, what the {context}-token context leaves after a {prompt_tokens}-token prompt]",
              file=sys.stderr)
    return min(DEFAULT_MAX_NEW_TOKENS, room)


def load_for_generation(args: argparse.Namespace):
    """(model on its device, tokenizer, template) from the parsed common arguments."""
    import torch

    from llmstages.model.checkpoint import load_model
    from llmstages.tools.common import DEFAULT_CACHE_DIR, model_template, resolve_tokenizer

    loaded = load_model(args.model)
    if loaded.is_reward_model:
        raise ValueError(f"{args.model} is a reward model (value head): it scores text, it does not generate")
    tokenizer = resolve_tokenizer(loaded, args.tokenizer, args.cache_dir or DEFAULT_CACHE_DIR)
    template = model_template(loaded, args.template, tokenizer)
    model = loaded.model.to(torch.device(args.device))
    return model, tokenizer, template


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llmstages generate", description=HELP)
    add_sampling_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a user message; repeat for several prompts")
    source.add_argument("--prompts", help="a file: one prompt per line, or .jsonl rows with 'messages' or 'prompt'")
    parser.add_argument("--raw", action="store_true", help="continue the prompt text as is (no chat template)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    from llmstages.errors import as_user_error

    with as_user_error(ValueError, FileNotFoundError):
        results = run(args)
    for i, row in enumerate(results):
        if args.jsonl:
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"=== [{i}] {'stopped' if row['stopped'] else 'max tokens'}\n{row['reply']}")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from llmstages.model.generate import generate_batch
    from llmstages.tools.common import as_messages, padding_id, read_prompts

    prompts = args.prompt if args.prompt is not None else read_prompts(args.prompts)
    model, tokenizer, template = load_for_generation(args)
    if args.raw:
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("--raw continues plain text: the prompts must be strings, not messages")
        encoded = [tokenizer.encode(p) for p in prompts]
    else:
        encoded = [template.encode_prompt(as_messages(p), tokenizer) for p in prompts]
    max_new_tokens = new_token_budget(args.max_new_tokens, max(map(len, encoded)), model.config.max_seq_len)
    stop_ids = {tokenizer.eos_id} if args.raw else {template.stop_token_id(tokenizer), tokenizer.eos_id}
    generator = torch.Generator().manual_seed(args.seed)
    results: list[dict] = []
    for start in range(0, len(encoded), args.batch_size):
        batch = encoded[start : start + args.batch_size]
        outputs = generate_batch(
            model, batch, max_new_tokens, stop_ids=stop_ids, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, generator=generator, pad_id=padding_id(tokenizer, model),
        )
        for prompt, (new, stopped) in zip(prompts[start : start + args.batch_size], outputs):
            results.append({
                "prompt": prompt,
                "reply": tokenizer.decode(new, skip_special_tokens=True),
                "stopped": stopped,
                "new_tokens": len(new),
            })
    return results
