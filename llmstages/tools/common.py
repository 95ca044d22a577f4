"""What the model tools share: a trained model's tokenizer and chat template.

Design choices:
- The model itself is loaded by `llmstages.model.checkpoint.load_model` (a `.ckpt` of any
  stage or a Hugging Face folder; LoRA merged; a reward model's value head beside it).
- The tokenizer is, in order: the one given; the one the checkpoint's data
  module recorded (`datamodule_hyper_parameters.tokenizer`, when Lightning
  saved them); a Hugging Face source's own `tokenizer.json` (the folder
  itself, or the `.ckpt`'s `init_from` / `imported_from` folder); else the embedded default
  tokenizer, trained once in `cache_dir` as the data modules do. Its size
  must fit the model's embedding, or the wrong tokenizer is named; a pad
  token the tokenizer appended (a folder whose tokenizer has no pad, as
  Llama 3.x ships) may lie one past the last row: inference never embeds it
  (`padding_id` pads with a row the model has, under the mask).
- The chat template is the one given, else the recorded one, else `chatml`
  (the SFT data's default).
"""

from __future__ import annotations

from pathlib import Path

from llmstages.model.checkpoint import LoadedModel

DEFAULT_CACHE_DIR = ".cache/llmstages"


def resolve_tokenizer(loaded: LoadedModel, tokenizer: str | None, cache_dir: str | Path = DEFAULT_CACHE_DIR):
    """The tokenizer for `loaded` (see the module docstring for the order); checks its size."""
    from llmstages.data.tokenizer import Tokenizer

    data_hp = loaded.data_hyper_parameters
    # the HF folder the weights came from: a stage's init_from, or what `llmstages import` read
    folders = [loaded.hyper_parameters.get(k) for k in ("init_from", "imported_from")]
    hf_folder = next((Path(f) for f in folders if f and (Path(f) / "tokenizer.json").is_file()), None)
    if tokenizer is not None:
        result, origin = Tokenizer.from_file(tokenizer), f"--tokenizer {tokenizer}"
    elif data_hp.get("tokenizer"):
        result, origin = Tokenizer.from_file(data_hp["tokenizer"]), f"the checkpoint's tokenizer {data_hp['tokenizer']}"
    elif loaded.source.is_dir():
        if not (loaded.source / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {loaded.source}; pass --tokenizer")
        result, origin = Tokenizer.from_file(loaded.source), f"{loaded.source}/tokenizer.json"
    elif hf_folder is not None:
        result, origin = Tokenizer.from_file(hf_folder), f"{hf_folder}/tokenizer.json"
    else:
        from llmstages.data.base import default_tokenizer

        cache = data_hp.get("cache_dir") or cache_dir
        result, origin = default_tokenizer(cache), "the embedded default tokenizer"
        if result.vocab_size != loaded.model.config.vocab_size:
            raise ValueError(
                f"{loaded.source}: the model has {loaded.model.config.vocab_size} embedding rows but "
                f"{origin} has {result.vocab_size} tokens; pass the run's tokenizer with --tokenizer"
            )
    rows = loaded.model.config.vocab_size
    # a pad token the tokenizer appended (a folder without one, e.g. Llama 3.x) needs no row: padding is masked
    beyond = result.vocab_size - rows - (1 if result.pad_id >= rows else 0)
    if beyond > 0:
        raise ValueError(
            f"{origin} has {result.vocab_size} tokens, more than the model's "
            f"{rows} embedding rows: not this model's tokenizer"
        )
    return result


def model_template(loaded: LoadedModel, template: str | None, tokenizer):
    """The chat template: the one given, else the run's recorded one, else chatml; auto/hf: the tokenizer's own."""
    from llmstages.data.chat import DEFAULT_TEMPLATE, resolve_template

    name = template or loaded.data_hyper_parameters.get("template") or DEFAULT_TEMPLATE
    return resolve_template(name, tokenizer)


def read_prompts(path: str | Path) -> list[list[dict[str, str]] | str]:
    """Prompts from a file (`formats.read_prompts`, format `lines`): `.jsonl` rows with `messages`
    (echoed as written) or a `prompt` string, else one plain prompt per line (a string)."""
    from llmstages.data.formats import read_prompts as read_prompt_records

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    records, _ = read_prompt_records(path, format="lines")
    prompts: list[list[dict[str, str]] | str] = []
    for record in records:
        if record["text"] is not None:
            prompts.append(record["text"])
        elif record["answer"] is not None:  # the row's reference reply: as_messages drops it again
            prompts.append([*record["messages"], {"role": "assistant", "content": record["answer"]}])
        else:
            prompts.append(list(record["messages"]))
    return prompts


def as_messages(prompt: list[dict[str, str]] | str) -> list[dict[str, str]]:
    """A conversation ending before the assistant's reply (a plain string is one user message)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()  # a reference reply at the end is what we are asked to generate
    if not messages:
        raise ValueError("a prompt needs at least one message before the reply")
    return messages


def padding_id(tokenizer, model) -> int:
    """An id to fill a batch's padding with: the tokenizer's pad, or its end of text when the model has no pad row.

    Padding is masked, so any id the embedding has works; a model folder without a pad token (Llama 3.x)
    has one row fewer than the tokenizer that got `<|pad|>` appended.
    """
    return tokenizer.pad_id if tokenizer.pad_id < model.config.vocab_size else tokenizer.eos_id
