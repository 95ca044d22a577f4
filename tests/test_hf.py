"""Hugging Face interop: logits match transformers on import, export and round trip.

Every model here is small and random, with randomised norm weights and
biases, so a dropped or misnamed tensor changes the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmstages.model import ModelConfig, Transformer
from llmstages.model.hf import config_from_hf, config_to_hf, from_hf, hf_tensor_names, state_dict_to_hf, to_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config  # noqa: E402

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4)
TOL = 1e-4
# Llama 3.1/3.2's RoPE scaling with a short original context, so 17 positions reach the scaled band
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _exported_class(case: str) -> str:
    """What `to_hf(architecture="auto")` writes for a case: q/k norm -> Qwen3, q/k/v bias -> Qwen2, else Llama."""
    return {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(case[:5], "LlamaForCausalLM")


def _randomise(model: torch.nn.Module) -> None:
    """Norm weights and biases away from their 1/0 init, so a missing one cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))


def _hf_model(config) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_config(config)
    _randomise(model)
    return model.eval()


def _save(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def _load_hf(path: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], f"{key}: {info[key]}"
    return model.eval()


@torch.no_grad()
def _max_diff(ours: Transformer, hf: torch.nn.Module, ids: torch.Tensor) -> float:
    return (ours(ids).float() - hf(ids).logits.float()).abs().max().item()


def _ids(vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17))


CASES = {
    # untied, GQA, non-default rope base
    "llama-gqa-untied": lambda: LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=5000.0),
    # tied, MHA
    "llama-mha-tied": lambda: LlamaConfig(**SMALL, num_key_value_heads=4, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "qwen2-bias-tied": lambda: Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2-bias-untied": lambda: Qwen2Config(**SMALL, num_key_value_heads=1),
    "mistral-gqa": lambda: MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None),
    # Llama 3.x: llama3 RoPE scaling, GQA, tied (3.2) and untied (3.1)
    "llama3-rope-tied": lambda: LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True,
                                            rope_parameters=dict(LLAMA3_ROPE), max_position_embeddings=128),
    "llama3-rope-untied": lambda: LlamaConfig(**SMALL, num_key_value_heads=1, rope_parameters=dict(LLAMA3_ROPE)),
    # an explicit head_dim != hidden/heads on Llama
    "llama-head-dim": lambda: LlamaConfig(**SMALL, num_key_value_heads=2, head_dim=24),
    # Qwen3: q/k norm, head_dim != hidden/heads, no bias
    "qwen3-qknorm-tied": lambda: Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    "qwen3-qknorm-untied": lambda: Qwen3Config(**SMALL, num_key_value_heads=4, head_dim=8, rope_theta=1e6),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_checkpoint(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    torch.manual_seed(1)
    model = _hf_model(CASES[request.param]())
    return request.param, model, _save(model, tmp_path_factory.mktemp(request.param))


def test_from_hf_matches_transformers(hf_checkpoint):
    name, hf, path = hf_checkpoint
    ours = from_hf(path)
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    assert ours.config.qkv_bias == name.startswith("qwen2")
    assert ours.config.qk_norm == name.startswith("qwen3")
    assert ours.config.head_dim == (getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads)
    assert (ours.config.rope_scaling is not None) == name.startswith("llama3")
    assert ours.config.n_kv_head == hf.config.num_key_value_heads
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in ours.parameters())
    assert _max_diff(ours, hf, _ids()) < TOL


def test_round_trip_loads_in_transformers(hf_checkpoint, tmp_path):
    name, hf, path = hf_checkpoint
    out = to_hf(from_hf(path), tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [_exported_class(name)]
    tensors = load_file(out / "model.safetensors")
    # tied embeddings are written once, as HF expects
    assert ("lm_head.weight" in tensors) == (not hf.config.tie_word_embeddings)
    reloaded = _load_hf(out)
    ids = _ids()
    with torch.no_grad():
        assert (reloaded(ids).logits - hf(ids).logits).abs().max().item() < TOL


def test_mistral_sliding_window_caps_max_seq_len(tmp_path):
    hf = _hf_model(MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=8, max_position_embeddings=64))
    path = _save(hf, tmp_path)
    with pytest.warns(UserWarning, match="sliding_window=8"):
        ours = from_hf(path)
    assert ours.config.max_seq_len == 8
    # inside the window the windowed model is exactly full causal attention
    assert _max_diff(ours, hf, torch.randint(0, 300, (2, 8))) < TOL
    with pytest.raises(ValueError, match="max_seq_len"):
        ours(torch.randint(0, 300, (1, 9)))


def test_our_model_exports_to_transformers(tmp_path):
    ours = Transformer(ModelConfig.from_name("tiny", rope_theta=20000.0)).eval()
    _randomise(ours)
    out = to_hf(ours, tmp_path, eos_token_id=2)
    hf = _load_hf(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.eos_token_id == 2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert _max_diff(ours, hf, _ids(512)) < TOL


@pytest.mark.parametrize("architecture", ["qwen2", "mistral", "Qwen2ForCausalLM"])
def test_export_as_other_families(tmp_path, architecture):
    ours = Transformer(ModelConfig.from_name("tiny", tie_embeddings=False)).eval()
    _randomise(ours)
    hf = _load_hf(to_hf(ours, tmp_path, architecture=architecture))
    assert type(hf).__name__.lower().startswith(architecture.lower()[:5])
    assert _max_diff(ours, hf, _ids(512)) < TOL


def test_qwen2_bias_model_exports_with_bias(tmp_path):
    ours = Transformer(ModelConfig.from_name("tiny", qkv_bias=True)).eval()
    _randomise(ours)
    hf = _load_hf(to_hf(ours, tmp_path))
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    assert _max_diff(ours, hf, _ids(512)) < TOL
    with pytest.raises(ValueError, match="qkv_bias"):
        to_hf(ours, tmp_path / "llama", architecture="llama")


def test_packed_rows_match_transformers_per_document(tmp_path):
    torch.manual_seed(2)
    hf = _hf_model(Qwen2Config(**SMALL, num_key_value_heads=2))
    ours = from_hf(_save(hf, tmp_path))
    ids = torch.randint(0, 300, (1, 12))
    docs = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = ours(ids, document_ids=docs)
        first, second = hf(ids[:, :5]).logits, hf(ids[:, 5:]).logits
    assert (packed[:, :5] - first).abs().max().item() < TOL
    assert (packed[:, 5:] - second).abs().max().item() < TOL


def test_sharded_checkpoint(tmp_path):
    hf = _hf_model(LlamaConfig(**SMALL, num_key_value_heads=2))
    path = _save(hf, tmp_path, max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    assert _max_diff(from_hf(path), hf, _ids()) < TOL


def test_tied_checkpoint_with_stored_lm_head(tmp_path):
    hf = _hf_model(LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True))
    path = _save(hf, tmp_path)
    tensors = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ours = from_hf(path)
    assert ours.lm_head is None
    assert _max_diff(ours, hf, _ids()) < TOL


def test_dtype_argument(tmp_path):
    hf = _hf_model(LlamaConfig(**SMALL, num_key_value_heads=2))
    ours = from_hf(_save(hf, tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert torch.equal(ours.embed.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))


# ---------------------------------------------------------------- config mapping and errors


def _base_config(**overrides) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    }
    config.update(overrides)
    return config


def test_config_from_hf_legacy_and_new_rope_fields():
    assert config_from_hf(_base_config(rope_theta=123.0, rope_scaling=None)).rope_theta == 123.0
    assert config_from_hf(_base_config(rope_parameters={"rope_type": "default", "rope_theta": 7.0})).rope_theta == 7.0
    assert config_from_hf(_base_config()).rope_theta == 10000.0
    defaults = config_from_hf(_base_config())
    assert (defaults.max_seq_len, defaults.norm_eps, defaults.tie_embeddings) == (2048, 1e-6, False)
    qwen = config_from_hf(_base_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2"))
    assert qwen.qkv_bias and qwen.max_seq_len == 32768


def test_config_round_trip():
    config = ModelConfig.from_name("qwen2-0.5b")
    assert config_from_hf(config_to_hf(config)) == config
    tiny = ModelConfig.from_name("tiny", tie_embeddings=False, rope_theta=3.0, norm_eps=1e-5)
    assert config_from_hf(config_to_hf(tiny)) == tiny


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
        ({"architectures": None, "model_type": "gpt2"}, "gpt2"),
        # llama3 scaling without its parameters: the missing ones are named
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3.*low_freq_factor"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "config.json rope_parameters.*dynamic"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "head_dim": 32}, "head_dim=32 for qwen2"),
        ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": True}, "attention_bias"),
        ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, "Qwen3MoeForCausalLM"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(_base_config(**overrides))


def test_unsupported_architecture_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        from_hf(tmp_path)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        from_hf(tmp_path)


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_base_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        from_hf(tmp_path)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return _save(_hf_model(LlamaConfig(**SMALL, num_key_value_heads=2)), tmp_path_factory.mktemp("llama"))


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(llama_folder, tmp_path):
    path = _edited_copy(llama_folder, tmp_path / "m", lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.post_attention_layernorm\.weight"):
        from_hf(path)


def test_unexpected_tensor_is_named(llama_folder, tmp_path):
    path = _edited_copy(llama_folder, tmp_path / "u", lambda t: t.update({"score.weight": torch.zeros(1, 64)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: score\.weight"):
        from_hf(path)


def test_stale_rotary_buffers_are_ignored(llama_folder, tmp_path):
    def add(t: dict) -> None:
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    path = _edited_copy(llama_folder, tmp_path / "r", add)
    reference = from_hf(llama_folder)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(from_hf(path)(ids), reference(ids))


def test_wrong_shape_is_named(llama_folder, tmp_path):
    def shrink(t: dict) -> None:
        t["model.norm.weight"] = torch.ones(32)

    with pytest.raises(ValueError, match=r"norm\.weight \(32,\) \(expected \(64,\)\)"):
        from_hf(_edited_copy(llama_folder, tmp_path / "s", shrink))


def test_state_dict_to_hf_names():
    model = Transformer(ModelConfig.from_name("tiny"))
    tensors = state_dict_to_hf(model.state_dict(), model.config)
    assert sorted(tensors) == sorted(hf_tensor_names(model.config))
    assert all(t.is_contiguous() for t in tensors.values())
    with pytest.raises(ValueError, match="unexpected"):
        state_dict_to_hf({**model.state_dict(), "extra.weight": torch.zeros(1)}, model.config)


def test_stage_init_from_hugging_face_folder(hf_checkpoint, tmp_path):
    """`init_from: <HF folder>` starts a stage from the downloaded-checkpoint stand-in."""
    from llmstages.stages import SFTModule

    _, hf, path = hf_checkpoint
    config = config_from_hf(json.loads((path / "config.json").read_text()))
    stage = SFTModule(model=config, init_from=str(path), generate_samples=0)
    ids = _ids(config.vocab_size)
    before = stage.backbone.eval()(ids)
    stage.setup("fit")
    assert _max_diff(stage.backbone.eval(), hf, ids) < 1e-4
    assert not torch.allclose(before, stage.backbone(ids))  # the weights really changed


def test_init_from_hf_folder_takes_its_shape_and_grows_the_vocab_for_a_new_pad(hf_checkpoint):
    """Through the CLI a stage gets only `init_from` and the tokenizer's vocab size (which may
    add a pad token): the architecture comes from config.json, the extra row from the mean."""
    from llmstages.stages import SFTModule

    _, hf, path = hf_checkpoint
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    stage = SFTModule(init_from=str(path), vocab_size=vocab + 1, generate_samples=0)  # preset "tiny" ignored
    stage.setup("fit")
    assert stage.config.vocab_size == vocab + 1 and stage.config.d_model == hf.config.hidden_size
    ids = _ids(vocab)
    with torch.no_grad():
        ours = stage.backbone.eval()(ids)
        theirs = hf(ids).logits
    assert (ours[..., :vocab] - theirs).abs().max() < 1e-4
    embed = stage.backbone.embed.weight
    torch.testing.assert_close(embed[vocab], embed[:vocab].mean(0))
    smaller = SFTModule(init_from=str(path), vocab_size=vocab - 10, generate_samples=0)
    assert smaller.config.vocab_size == vocab  # a padded checkpoint vocabulary is kept whole


# ---------------------------------------------------------------- Llama 3.x and Qwen3 specifics


def test_llama3_rope_scaling_is_what_makes_the_logits_match(tmp_path):
    hf = _hf_model(LlamaConfig(**SMALL, num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE)))
    ours = from_hf(_save(hf, tmp_path))
    assert ours.config.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    ids = torch.randint(0, 300, (2, 40))
    assert _max_diff(ours, hf, ids) < TOL
    plain = Transformer(ModelConfig.from_dict({**ours.config.to_dict(), "rope_scaling": None})).eval()
    plain.load_state_dict(ours.state_dict())
    assert _max_diff(plain, hf, ids) > 1e-3  # without the scaling the same weights disagree


def test_llama3_config_in_the_transformers_4_layout():
    """4.x writes rope_scaling with the type and factors, and rope_theta at the top level."""
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    config = config_from_hf(_base_config(rope_theta=500000.0, rope_scaling=scaling))
    assert config.rope_theta == 500000.0 and config.rope_scaling == scaling


def test_qwen3_defaults_head_dim_128_when_config_json_omits_it():
    config = config_from_hf(_base_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3"))
    assert config.head_dim == 128 and config.qk_norm and not config.qkv_bias


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama3.2-1b", "1b"])
def test_real_shape_presets_round_trip_through_config_json(preset):
    config = ModelConfig.from_name(preset)
    assert config_from_hf(config_to_hf(config)) == config


def test_our_qk_norm_model_exports_as_qwen3(tmp_path):
    ours = Transformer(ModelConfig.from_name("tiny", qk_norm=True, head_dim=24, tie_embeddings=False)).eval()
    _randomise(ours)
    hf = _load_hf(to_hf(ours, tmp_path))
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.config.head_dim == 24
    assert _max_diff(ours, hf, _ids(512)) < TOL
    with pytest.raises(ValueError, match="qk_norm"):
        to_hf(ours, tmp_path / "llama", architecture="llama")
    with pytest.raises(ValueError, match="qk_norm"):
        to_hf(Transformer(ModelConfig.from_name("tiny")), tmp_path / "qwen3", architecture="qwen3")


def test_our_llama3_scaled_model_exports_and_reloads(tmp_path):
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    ours = Transformer(ModelConfig.from_name("tiny", rope_theta=5e5, rope_scaling=scaling)).eval()
    _randomise(ours)
    out = to_hf(ours, tmp_path)
    written = json.loads((out / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == written["rope_scaling"]["rope_type"] == "llama3"
    assert _max_diff(ours, _load_hf(out), torch.randint(0, 512, (2, 40))) < TOL
    assert from_hf(out).config == ours.config
