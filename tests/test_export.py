"""Export ready for use: tokenizer, chat template, stop ids, reward models, LoRA merge; import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmstages.data.chat import ChatTemplate
from llmstages.data.tokenizer import IM_END, Tokenizer
from llmstages.model import ModelConfig, Transformer
from llmstages.model.hf import from_hf, to_hf, to_hf_reward
from llmstages.model.lora import LoRAConfig, apply_lora

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "You are terse.\nVery terse."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "  Another one, with spaces?\n\n"}],
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [m["content"] for c in CONVERSATIONS for m in c] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    return Tokenizer.train(texts, vocab_size=400, show_progress=False)


def _model(vocab: int, **overrides) -> Transformer:
    return Transformer(ModelConfig.from_name("tiny", vocab_size=vocab, tie_embeddings=False, **overrides)).eval()


def _always_says(model: Transformer, token: int) -> Transformer:
    """Make greedy decoding emit `token` at every step: a residual dimension no block writes to,
    constant in every embedding, read by that token's output row only."""
    with torch.no_grad():
        model.embed.weight[:, 0] = 10.0
        for block in model.blocks:
            block.attn.o_proj.weight[0] = 0.0
            block.mlp.down_proj.weight[0] = 0.0
        model.norm.weight[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[token, 0] = 50.0
    return model


def _export_chat(model, tokenizer, out: Path, template: str = "chatml") -> Path:
    chat = ChatTemplate.get(template)
    return to_hf(model, out, tokenizer=tokenizer, eos_token_id=[chat.stop_token_id(tokenizer), tokenizer.eos_id],
                 chat_template=chat.jinja)


def test_exported_chat_template_renders_our_prompt_ids(tokenizer, tmp_path):
    out = _export_chat(_model(tokenizer.vocab_size), tokenizer, tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(out)
    chatml = ChatTemplate.get("chatml")
    for messages in CONVERSATIONS:
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == chatml.encode_prompt(messages, tokenizer)
        text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == chatml.render(messages, add_generation_prompt=True)
    assert hf_tok.eos_token == tokenizer.eos_token and hf_tok.pad_token_id == tokenizer.pad_id
    # the one place ids must differ: transformers turns a marker written in the text into its special id,
    # our encoder keeps user text as text (see llmstages.data.tokenizer)
    marker = [{"role": "user", "content": f"say {IM_END}"}]
    assert hf_tok.apply_chat_template(marker, tokenize=False) == chatml.render(marker)
    assert hf_tok(f"say {IM_END}")["input_ids"][-1] == tokenizer.token_to_id(IM_END)
    assert tokenizer.token_to_id(IM_END) not in tokenizer.encode(f"say {IM_END}")
    with pytest.raises(Exception, match="unknown role"):
        hf_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("template", ["llama3", "plain"])
def test_other_templates_render_the_same_text(tokenizer, tmp_path, template):
    """Text is identical; ids may differ where our encoder splits segments (e.g. "\\n\\n" before content)."""
    chat = ChatTemplate.get(template)
    out = _export_chat(_model(tokenizer.vocab_size), tokenizer, tmp_path, template)
    hf_tok = AutoTokenizer.from_pretrained(out)
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            assert rendered == chat.render(messages, add_generation_prompt=generation_prompt,
                                           eos_token=tokenizer.eos_token)


def test_transformers_generate_stops_at_end_of_turn(tokenizer, tmp_path):
    im_end = tokenizer.token_to_id(IM_END)
    model = _always_says(_model(tokenizer.vocab_size), im_end)
    out = _export_chat(model, tokenizer, tmp_path / "chat")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [im_end, tokenizer.eos_id] and generation["pad_token_id"] == tokenizer.pad_id
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    generated = hf.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated[0, prompt["input_ids"].shape[1]:].tolist() == [im_end]
    # the failure this fixes: with only end-of-text as eos, generate emits <|im_end|> until max_new_tokens
    plain = to_hf(model, tmp_path / "eos-only", eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    runaway = AutoModelForCausalLM.from_pretrained(plain).generate(**prompt, max_new_tokens=6, do_sample=False)
    assert runaway[0, prompt["input_ids"].shape[1]:].tolist() == [im_end] * 6


def test_reward_model_exports_as_sequence_classification(tokenizer, tmp_path):
    from llmstages.stages import RewardModule

    config = ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    stage = RewardModule(model=config).eval()
    with torch.no_grad():
        for name, p in stage.backbone.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    lengths = [9, 5, 12]
    ids = torch.full((3, 12), tokenizer.pad_id)
    labels = torch.full((3, 12), -100)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(10, 300, (n,))
        labels[row, 3:n] = ids[row, 3:n]  # the reply, its last token the end-of-turn: the last real token
    with torch.no_grad():
        ours = stage.rewards(ids, labels)
    out = to_hf_reward(stage.backbone, stage.value_head.weight, tmp_path, tokenizer=tokenizer)
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["LlamaForSequenceClassification"] and written["pad_token_id"] == tokenizer.pad_id
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_labels == 1
    torch.testing.assert_close(hf.score.weight, stage.value_head.weight.detach())
    with torch.no_grad():
        theirs = hf(ids, attention_mask=(ids != tokenizer.pad_id).long()).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pad_token_id"):
        to_hf_reward(stage.backbone, stage.value_head.weight, tmp_path / "nopad")


@pytest.mark.parametrize(
    "overrides, cls",
    [({"qkv_bias": True}, "Qwen2ForSequenceClassification"),
     ({"qk_norm": True, "head_dim": 24}, "Qwen3ForSequenceClassification")],
)
def test_qwen_reward_model_classes(tokenizer, tmp_path, overrides, cls):
    model = _model(tokenizer.vocab_size, **overrides)
    head = torch.randn(1, model.config.d_model)
    out = to_hf_reward(model, head, tmp_path, pad_token_id=tokenizer.pad_id)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == cls
    ids = torch.randint(10, 300, (1, 7))
    with torch.no_grad():
        expected = model.hidden_states(ids)[0, -1] @ head[0]
        torch.testing.assert_close(hf(ids).logits[0, 0], expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the export / import commands


def _checkpoint(path: Path, model: Transformer, extra_state: dict | None = None, **hparams) -> Path:
    """A checkpoint with what Lightning stores for a stage: hyper-parameters and a prefixed state dict."""
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state.update(extra_state or {})
    torch.save({"state_dict": state, "hyper_parameters": {"model": model.config.to_dict(), **hparams}}, path)
    return path


def _tokenizer_dir(tokenizer: Tokenizer, tmp_path: Path) -> Path:
    return tokenizer.save(tmp_path / "tokenizer")


def test_export_command_writes_a_chat_ready_folder(tokenizer, tmp_path):
    from llmstages.cli import main

    model = _model(tokenizer.vocab_size)
    ckpt = _checkpoint(tmp_path / "sft.ckpt", model)
    out = tmp_path / "hf"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--tokenizer", str(_tokenizer_dir(tokenizer, tmp_path)),
          "--template", "chatml"])
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == ChatTemplate.get("chatml").jinja
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == [tokenizer.token_to_id(IM_END), tokenizer.eos_id]
    assert config["pad_token_id"] == tokenizer.pad_id
    ids = torch.randint(0, tokenizer.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_export_command_merges_lora(tokenizer, tmp_path):
    from llmstages.tools.export import export

    lora = LoRAConfig(rank=4, alpha=8, targets=["q", "v", "down"])
    model = apply_lora(_model(tokenizer.vocab_size), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    ckpt = _checkpoint(tmp_path / "lora.ckpt", Transformer(model.config), lora=lora.to_dict())
    torch.save({**torch.load(ckpt, weights_only=False),
                "state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    out = export(ckpt, tmp_path / "hf", tokenizer=str(_tokenizer_dir(tokenizer, tmp_path)))
    ids = torch.randint(0, tokenizer.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(from_hf(out)(ids), model(ids), atol=1e-5, rtol=1e-5)
        # an adapted model in memory exports merged too, and stays adapted
        direct = to_hf(model, tmp_path / "direct")
        torch.testing.assert_close(from_hf(direct)(ids), model(ids), atol=1e-5, rtol=1e-5)
        assert "blocks.0.attn.q_proj.lora_a" in model.state_dict()
    # adapters without their settings cannot be merged: an error, not a silent base-only export
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": model.config.to_dict()}}, bare)
    with pytest.raises(ValueError, match="no 'lora' settings"):
        export(bare, tmp_path / "hf2", tokenizer=str(_tokenizer_dir(tokenizer, tmp_path)))


def test_export_command_reward_model_and_refusal(tokenizer, tmp_path, capsys):
    from llmstages.cli import main

    model = _model(tokenizer.vocab_size)
    head = torch.randn(1, model.config.d_model)
    ckpt = _checkpoint(tmp_path / "rm.ckpt", model, {"value_head.weight": head})
    tok = str(_tokenizer_dir(tokenizer, tmp_path))
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "rm"), "--tokenizer", tok])
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(hf.score.weight, head)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "lm"), "--tokenizer", tok, "--as", "causal-lm"])
    assert exit_info.value.code == 2
    assert "reward model" in capsys.readouterr().err and not (tmp_path / "lm").exists()


def test_export_needs_a_matching_tokenizer(tokenizer, tmp_path, capsys):
    from llmstages.cli import main

    ckpt = _checkpoint(tmp_path / "small-vocab.ckpt", _model(300))
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"),
              "--tokenizer", str(_tokenizer_dir(tokenizer, tmp_path))])
    assert "more than the model's 300 embedding rows" in capsys.readouterr().err


def test_import_command_writes_a_checkpoint_init_from_reads(tmp_path):
    from llmstages.cli import main
    from llmstages.model.checkpoint import load_backbone_weights, load_model

    source = _model(320, qk_norm=True, head_dim=24)
    folder = to_hf(source, tmp_path / "hf")
    ckpt = tmp_path / "imported.ckpt"
    main(["import", "--hf", str(folder), "--out", str(ckpt)])
    checkpoint = torch.load(ckpt, weights_only=True)
    assert ModelConfig.from_dict(checkpoint["hyper_parameters"]["model"]) == source.config
    target = Transformer(source.config)
    load_backbone_weights(target, ckpt)
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(ids), source(ids))
        torch.testing.assert_close(load_model(ckpt).model(ids), source(ids))


def test_import_of_a_folder_without_config_json_is_a_clear_error(tmp_path, capsys):
    from llmstages.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["import", "--hf", str(tmp_path / "empty"), "--out", str(tmp_path / "x.ckpt")])
    assert "no config.json in" in capsys.readouterr().err


def test_export_with_the_model_folders_own_template(tokenizer, tmp_path):
    """--template hf keeps a downloaded model's Jinja template and stop ids (here a Llama-3-style one)."""
    from llmstages.tools.export import export

    own = ("{%- for m in messages -%}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] "
           "| trim + '<|eot_id|>' -}}{%- endfor -%}{%- if add_generation_prompt -%}"
           "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}")
    source = tmp_path / "downloaded"
    eot, other = tokenizer.token_to_id("<|eot_id|>"), tokenizer.token_to_id(IM_END)
    to_hf(_model(tokenizer.vocab_size), source, tokenizer=tokenizer, chat_template=own, eos_token_id=[eot, other])
    ckpt = _checkpoint(tmp_path / "sft.ckpt", _model(tokenizer.vocab_size), init_from=str(source))
    out = export(ckpt, tmp_path / "hf", template="hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == own
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [eot, other, tokenizer.eos_id]
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert rendered == "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
    bare = _checkpoint(tmp_path / "bare.ckpt", _model(tokenizer.vocab_size))
    with pytest.raises(ValueError, match="own chat template"):
        export(bare, tmp_path / "hf2", template="hf", tokenizer=str(_tokenizer_dir(tokenizer, tmp_path)))
