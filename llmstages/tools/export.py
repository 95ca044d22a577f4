"""`llmstages export --ckpt CKPT --out DIR`: a ready-to-use Hugging Face folder from a checkpoint.

Design choices:
- The folder always has the weights, `config.json`, the tokenizer with its
  special tokens, the chat template (Jinja, in `tokenizer_config.json`) and a
  `generation_config.json` whose `eos_token_id` lists the template's
  end-of-turn id and the end-of-text id, with `pad_token_id` set: so
  `transformers` `generate` stops after a reply and `apply_chat_template`
  works. Tokenizer and template are found as `llmstages.tools.common`
  describes (without `--tokenizer`: the recorded one, an HF `init_from`'s, or
  the embedded default, whose size must match the model).
- A checkpoint with a `value_head.weight` is a reward model: it exports as
  `<Family>ForSequenceClassification` (`--as reward`, the default for it);
  asking for a causal LM (`--as causal-lm`) is an error, because the value
  head cannot be represented there and dropping it silently is wrong.
- LoRA adapters are merged into the exported weights.
- `--template hf` (also taken when the run recorded `auto`/`hf`) keeps the
  model's own chat template: the Jinja from the Hugging Face folder the
  tokenizer or the weights came from (`tokenizer_config.json` or
  `chat_template.jinja`), and that folder's stop ids
  (`generation_config.json`, else `config.json`) plus the end of text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmstages.tools import TOOLS

HELP = TOOLS["export"].help
MODEL_OWN_TEMPLATE = ("hf", "auto")


def _template_folder(loaded, tokenizer: str | None) -> Path:
    """The Hugging Face folder whose own chat template `--template hf` keeps."""
    candidates = [Path(tokenizer) if tokenizer and Path(tokenizer).is_dir() else None]
    candidates += [Path(f) for f in (loaded.hyper_parameters.get(k) for k in ("init_from", "imported_from"))
                   if f and Path(f).is_dir()]
    for folder in candidates:
        if folder is not None and source_chat_template(folder, required=False) is not None:
            return folder
    raise ValueError(
        "--template hf keeps the model's own chat template, but neither the --tokenizer folder nor the "
        "checkpoint's init_from folder has one (tokenizer_config.json 'chat_template' or chat_template.jinja)"
    )


def source_chat_template(folder: Path, required: bool = True) -> str | None:
    """The Jinja chat template a Hugging Face folder ships (the `default` one of a named list)."""
    import json

    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template") if config_file.is_file() else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and required:
        raise ValueError(f"{folder}: no chat template in tokenizer_config.json or chat_template.jinja")
    return template


def source_stop_ids(folder: Path) -> list[int]:
    """The ids a Hugging Face folder's `generate` stops at: generation_config.json, else config.json."""
    import json

    for name in ("generation_config.json", "config.json"):
        file = folder / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(i) for i in (eos if isinstance(eos, list) else [eos])]
    raise ValueError(f"{folder}: no eos_token_id in generation_config.json or config.json")


def export(
    ckpt: str | Path,
    out: str | Path,
    *,
    tokenizer: str | None = None,
    template: str | None = None,
    kind: str = "auto",
    architecture: str = "auto",
    cache_dir: str | Path | None = None,
) -> Path:
    """Export `ckpt` to `out`; `kind` is auto, causal-lm or reward. Returns `out`."""
    from llmstages.model.hf import to_hf, to_hf_reward
    from llmstages.model.checkpoint import load_model
    from llmstages.tools.common import DEFAULT_CACHE_DIR, model_template, resolve_tokenizer

    if kind not in ("auto", "causal-lm", "reward"):
        raise ValueError(f"--as must be auto, causal-lm or reward, got {kind!r}")
    loaded = load_model(ckpt)
    if kind == "causal-lm" and loaded.is_reward_model:
        raise ValueError(
            f"{ckpt} is a reward model (it has value_head.weight): a causal LM cannot hold its value head; "
            "export it with --as reward (a ForSequenceClassification model)"
        )
    if kind == "reward" and not loaded.is_reward_model:
        raise ValueError(f"{ckpt} has no value_head.weight: it is not a reward model")
    tok = resolve_tokenizer(loaded, tokenizer, cache_dir or DEFAULT_CACHE_DIR)
    template = template or loaded.data_hyper_parameters.get("template")
    if template in MODEL_OWN_TEMPLATE:
        folder = _template_folder(loaded, tokenizer)
        jinja = source_chat_template(folder)
        stop_ids = [*source_stop_ids(folder), tok.eos_id]
    else:
        chat = model_template(loaded, template, tok)
        jinja = chat.jinja
        stop_ids = [chat.stop_token_id(tok), tok.eos_id]
    common = dict(architecture=architecture, eos_token_id=stop_ids, pad_token_id=tok.pad_id,
                  tokenizer=tok, chat_template=jinja)
    if loaded.is_reward_model:
        return to_hf_reward(loaded.model, loaded.value_head, out, **common)
    return to_hf(loaded.model, out, **common)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llmstages export", description=HELP)
    parser.add_argument("--ckpt", required=True, help="an llmstages .ckpt of any stage")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the checkpoint's, see docs)")
    parser.add_argument("--template", help="chat template written for the model: chatml, llama3, plain, or hf "
                                           "(the source folder's own; default: the recorded one, else chatml)")
    parser.add_argument("--as", dest="kind", default="auto", choices=("auto", "causal-lm", "reward"),
                        help="auto: a reward model (value head) exports as sequence classification, else causal LM")
    parser.add_argument("--architecture", default="auto", help="auto, llama, mistral, qwen2 or qwen3")
    parser.add_argument("--cache-dir", help="where the embedded default tokenizer is cached (.cache/llmstages)")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    from llmstages.errors import as_user_error

    with as_user_error(ValueError, FileNotFoundError, FileExistsError):
        out = export(args.ckpt, args.out, tokenizer=args.tokenizer, template=args.template, kind=args.kind,
                     architecture=args.architecture, cache_dir=args.cache_dir)
    print(f"wrote {out}")
