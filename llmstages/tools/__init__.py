"""The `llmstages` tool commands beside fit/validate: one module each with a `main(argv)`.

`TOOLS` lists them with their one-line help, here rather than in the modules,
so that `llmstages --help` lists every command without importing any of them
(the tools import torch and Lightning, which takes seconds).
"""

from __future__ import annotations

from typing import NamedTuple


class Tool(NamedTuple):
    module: str  # under llmstages.tools
    help: str


TOOLS: dict[str, Tool] = {
    "generate": Tool("generate", "generate replies to prompts (file or --prompt) from a .ckpt or a Hugging Face folder"),
    "chat": Tool("chat", "interactive multi-turn chat on stdin, streamed, from a .ckpt or a Hugging Face folder"),
    "export": Tool("export", "checkpoint -> Hugging Face folder (weights, tokenizer, chat template, generation config)"),
    "import": Tool("hf_import", "Hugging Face folder -> llmstages checkpoint (for init_from / export)"),
    "tokenizer": Tool("tokenizer", "train a byte-level BPE tokenizer on text files"),
    "data": Tool("data", "data prepare: tokenise a corpus once into token shards for streamed pretraining"),
    "masks": Tool("show_masks", "show which tokens of a config's data carry a loss (terminal or --html)"),
    "demo": Tool("demo", "train pretrain -> SFT -> reward model -> DPO -> GRPO on the embedded data and report what each learned"),
}
