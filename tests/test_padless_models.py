"""Model folders whose tokenizer has no pad token (Llama 3.x): import, generate, chat, export, back to transformers.

The folder has exactly as many embedding rows as its tokenizer has tokens; our tokenizer appends `<|pad|>`,
one past the last row. Inference never needs that row (a batch pads with any id under the mask), and the
export gives the folder's own vocabulary back.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

PROMPTS = ["What is 2 + 3?", "name three colours"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def folder(shared_data, tmp_path_factory) -> Path:
    """A random Llama-3-shaped model (GQA, llama3 RoPE scaling) beside minimind's 6400-token tokenizer."""
    minimind = shared_data / "minimind"
    out = tmp_path_factory.mktemp("padless") / "llama"
    config = LlamaConfig(
        vocab_size=6400, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are far from ties
        model.lm_head.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(minimind / name, out / name)
    return out


def _our_tokenizer(folder: Path):
    from llmstages.data.tokenizer import Tokenizer

    return Tokenizer.from_file(folder)


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    from llmstages.data.chat import ChatTemplate

    return ChatTemplate.get("chatml").encode_prompt([{"role": "user", "content": prompt}], tokenizer)


def _transformers_replies(model_folder: Path, tokenizer) -> list[str]:
    """Greedy replies by transformers' own `generate`, one prompt at a time, decoded as our tool decodes."""
    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    stops = [tokenizer.token_to_id("<|im_end|>"), tokenizer.eos_id]
    replies = []
    for prompt in PROMPTS:
        ids = torch.tensor([_prompt_ids(tokenizer, prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.eos_id)
        new = out[0, ids.shape[1]:].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        replies.append(tokenizer.decode(new, skip_special_tokens=True))
    return replies


def _generate(model: str | Path, capsys) -> list[str]:
    from llmstages.cli import main

    capsys.readouterr()
    main(["generate", "--model", str(model), *[a for p in PROMPTS for a in ("--prompt", p)],
          "--max-new-tokens", str(NEW_TOKENS), "--jsonl"])
    return [json.loads(line)["reply"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_the_folder_reproduces_the_issue(folder):
    tokenizer = _our_tokenizer(folder)
    assert tokenizer.vocab_size == 6401 and tokenizer.pad_id == 6400  # <|pad|> appended past the last row


def test_import_generate_chat_export_round_trip(folder, tmp_path, capsys, monkeypatch):
    from llmstages.cli import main

    tokenizer = _our_tokenizer(folder)
    expected = _transformers_replies(folder, tokenizer)
    assert all(len(set(reply)) > 2 for reply in expected), expected  # replies that can tell models apart
    assert _generate(folder, capsys) == expected  # batched (two prompts, left padding) and from the folder

    ckpt = tmp_path / "llama.ckpt"
    main(["import", "--hf", str(folder), "--out", str(ckpt)])
    assert _generate(ckpt, capsys) == expected

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPTS[0]}\n/reset\n{PROMPTS[1]}\n"))
    capsys.readouterr()
    main(["chat", "--model", str(ckpt), "--max-new-tokens", str(NEW_TOKENS)])
    printed = capsys.readouterr().out
    assert printed.count("assistant> ") == 2 and "[conversation reset]" in printed
    for reply in expected:
        assert f"assistant> {reply}\n" in printed

    out = tmp_path / "exported"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    exported = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert len(exported) == config["vocab_size"] == 6400  # tokenizer and embedding agree: the pad is dropped
    assert exported.pad_token is None and config.get("pad_token_id") is None
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == exported.get_vocab()
    assert _transformers_replies(out, tokenizer) == expected


def test_reward_export_of_a_padless_model_adds_a_pad_row_and_scores_as_we_do(folder, tmp_path):
    from llmstages.model.hf import from_hf, to_hf_reward
    from llmstages.data.chat import ChatTemplate

    tokenizer = _our_tokenizer(folder)
    backbone = from_hf(folder).eval()
    torch.manual_seed(1)
    head = torch.randn(1, backbone.config.d_model)
    template = ChatTemplate.get("chatml")
    out = to_hf_reward(backbone, head, tmp_path / "rm", tokenizer=tokenizer, chat_template=template.jinja)
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert len(hf_tokenizer) == hf.config.vocab_size == 6401 and hf.config.pad_token_id == tokenizer.pad_id
    conversation = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": "5"}]
    rendered = hf_tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered.endswith("<|im_end|>")  # the template ends at the scored end-of-turn token
    ids = torch.tensor([tokenizer.encode_rendered(rendered)[0]])
    with torch.no_grad():
        ours = backbone.hidden_states(ids)[0, -1] @ head[0]
        theirs = hf(ids).logits[0, 0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_a_model_trained_with_the_appended_pad_row_exports_row_and_token(folder, tmp_path, capsys):
    """`init_from` such a folder adds the pad's row (as a stage does); the export keeps both, and they agree."""
    from llmstages.cli import main
    from llmstages.model.config import ModelConfig
    from llmstages.model.hf import from_hf
    from llmstages.model.transformer import Transformer

    tokenizer = _our_tokenizer(folder)
    source = from_hf(folder)
    model = Transformer(ModelConfig.from_dict({**source.config.to_dict(), "vocab_size": tokenizer.vocab_size}))
    state = source.state_dict()
    for name in ("embed.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], state[name].mean(0, keepdim=True)])
    model.load_state_dict(state)
    ckpt = tmp_path / "sft.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": model.config.to_dict(), "init_from": str(folder)}}, ckpt)
    expected = _generate(ckpt, capsys)
    out = tmp_path / "exported"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    exported = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert len(exported) == config["vocab_size"] == 6401 and exported.pad_token == "<|pad|>"
    assert config["pad_token_id"] == exported.pad_token_id == 6400
    assert _transformers_replies(out, tokenizer) == expected
