"""Backbone behaviour: causality, document isolation, GQA, config errors, counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmstages.model import ModelConfig, Transformer
from llmstages.model.transformer import apply_rope, positions_from_documents, rope_angles
from llmstages.model.packed_attention import DocumentSpans, packed_rows


def tiny(**overrides) -> Transformer:
    return Transformer(ModelConfig.from_name("tiny", **overrides)).eval()


def test_causality_later_tokens_never_change_earlier_logits():
    model = tiny()
    ids = torch.randint(0, 512, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_packed_row_equals_documents_run_alone():
    model = tiny()
    lengths = [7, 11, 5]
    docs = [torch.randint(0, 512, (1, n)) for n in lengths]
    pad = 3
    row = torch.cat(docs + [torch.zeros(1, pad, dtype=torch.long)], dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)] + [torch.full((1, pad), -1)], dim=1)
    with torch.no_grad():
        packed = model(row, document_ids=doc_ids)
        start = 0
        for doc, n in zip(docs, lengths):
            alone = model(doc)
            torch.testing.assert_close(packed[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
    assert torch.isfinite(packed).all()  # padding rows attend to padding, never to nothing


def test_changing_one_document_never_changes_another():
    model = tiny()
    row = torch.randint(0, 512, (1, 20))
    doc_ids = torch.tensor([[0] * 8 + [1] * 12])
    changed = row.clone()
    changed[0, :8] = torch.randint(0, 512, (8,))
    with torch.no_grad():
        a, b = model(row, document_ids=doc_ids), model(changed, document_ids=doc_ids)
    torch.testing.assert_close(a[:, 8:], b[:, 8:], rtol=0, atol=1e-6)
    # without document ids the second document does see the first one
    with torch.no_grad():
        c, d = model(row), model(changed)
    assert not torch.allclose(c[:, 8:], d[:, 8:])


def _packed_rows(lengths_per_row: list[list[int]], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token rows packed with documents of the given lengths, the rest padding (-1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (len(lengths_per_row), width), generator=gen)
    docs = torch.full((len(lengths_per_row), width), -1)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for doc, n in enumerate(lengths):
            docs[row, start : start + n] = doc
            start += n
    return ids, docs


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 4}, {"qk_norm": True}])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_per_document_attention_equals_the_dense_document_mask(overrides, checkpointing):
    """Packed rows run document by document; the dense block-diagonal mask is the reference:
    the same outputs and parameter gradients (float32, relative error <= 1e-6), padding included."""
    torch.manual_seed(0)
    ids, docs = _packed_rows([[7, 11, 5, 1], [40], [1, 1, 30, 2], [20, 20]], width=40)
    results = {}
    for dense in (True, False):
        torch.manual_seed(1)  # the same weights for both
        model = tiny(**overrides).train()
        model.activation_checkpointing = checkpointing
        model.packed_attention = "dense" if dense else "spans"
        hidden = model.hidden_states(ids, document_ids=docs)
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        results[dense] = (hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (h_dense, g_dense), (h_docs, g_docs) = results[True], results[False]
    assert _relative(h_docs, h_dense) <= 1e-6
    for name in g_dense:
        assert _relative(g_docs[name], g_dense[name]) <= 1e-6, name


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 4}])
def test_flex_attention_block_mask_equals_the_dense_document_mask(overrides):
    """CUDA's packed path (FlexAttention with a block mask from document_ids), forward only: PyTorch has
    no FlexAttention backward on CPU. Same outputs as the dense reference, padding included."""
    torch.manual_seed(0)
    ids, docs = _packed_rows([[7, 11, 5, 1], [40], [1, 1, 30, 2], [20, 20]], width=40)
    model = tiny(**overrides).eval()
    outputs = {}
    with torch.no_grad():
        for how in ("dense", "flex"):
            model.packed_attention = how
            outputs[how] = model.hidden_states(ids, document_ids=docs)
    assert _relative(outputs["flex"], outputs["dense"]) <= 1e-5
    assert isinstance(packed_rows(docs, "auto"), DocumentSpans)  # on a CPU: per document


@pytest.mark.parametrize("document", [64, 1024])
def test_per_document_attention_allocates_nothing_quadratic_in_the_row(document):
    """At T = 4096 no single allocation reaches T*T/4 bytes on the packed path, with short documents
    or long ones (a kernel that materialised a document's scores would, at 1024 tokens); the dense
    reference does (its [T, T] mask), so the measurement can see one."""
    length = 4096
    ids, docs = _packed_rows([[document] * (length // document)], width=length)
    peaks = {}
    for dense in (True, False):
        model = tiny(max_seq_len=length)
        model.packed_attention = "dense" if dense else "spans"
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                     profile_memory=True) as prof:
            model.hidden_states(ids, document_ids=docs)
        peaks[dense] = max(e.cpu_memory_usage for e in prof.events())
    assert peaks[True] >= length * length  # the reference's mask is visible to the measurement
    assert peaks[False] < length * length / 4


def test_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 5, 5, 5, 5, 5, 5]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(positions_from_documents(doc_ids), expected)


def test_gqa_equals_repeated_heads_reference():
    """Grouped-query attention computed by hand with each kv head repeated for its query group."""
    torch.manual_seed(1)
    cfg = ModelConfig.from_name("tiny", n_head=4, n_kv_head=2, n_layer=1)
    model = Transformer(cfg).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, cfg.d_model)
    pos = torch.arange(9).expand(2, 9)
    cos, sin = rope_angles(pos, cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        out = attn(x, cos, sin, None)
        q = attn.q_proj(x).view(2, 9, 4, cfg.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(2, 9, 2, cfg.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(2, 9, 2, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(2, dim=1)  # query heads 0,1 share kv head 0; 2,3 share kv head 1
        v = v.repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
        ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_head_receives_hidden_states_and_output_weight():
    model = tiny()
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        logits = model(ids)
        via_head = model(ids, head=lambda h, w: F.linear(h, w))
        hidden = model.hidden_states(ids)
    torch.testing.assert_close(logits, via_head)
    torch.testing.assert_close(logits, hidden @ model.output_weight.T)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"d_model": 66, "n_head": 4}, "n_head=4 must divide d_model=66"),
        ({"n_head": 4, "n_kv_head": 3}, "n_kv_head=3 must divide n_head=4"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"d_model": 12, "n_head": 4}, "head size 3 must be even"),
    ],
)
def test_bad_config_raises_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_name("tiny", **overrides)


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match="available: tiny"):
        ModelConfig.from_name("nope")


def test_too_long_sequence_is_an_error():
    model = tiny(max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_parameter_count_and_flops_follow_the_shape():
    cfg = ModelConfig.from_name("tiny")
    d, f, L, V, hd = cfg.d_model, cfg.d_mlp, cfg.n_layer, cfg.vocab_size, cfg.head_dim
    per_layer = d * d * 2 + 2 * d * cfg.n_kv_head * hd + 3 * d * f + 2 * d
    expected = V * d + L * per_layer + d  # tied output layer counted once
    model = Transformer(cfg)
    assert model.num_parameters() == expected
    assert model.flops_per_token(128) == 6 * (expected - V * d + V * d) + 12 * L * d * 128
    untied = Transformer(ModelConfig.from_name("tiny", tie_embeddings=False))
    assert untied.num_parameters() == expected + V * d
    assert untied.flops_per_token(128) == model.flops_per_token(128)


def test_initialisation_scales_residual_projections():
    model = Transformer(ModelConfig.from_name("small", n_layer=8, vocab_size=1024))
    std = model.config.init_std
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - std) < 0.1 * std
    assert abs(model.blocks[0].attn.o_proj.weight.std().item() - std / 4) < 0.1 * std / 4
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


# ---------------------------------------------------------------- newer config fields


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
# the features a cache has to get right at once: GQA, q/k norm, an explicit head_dim, llama3 RoPE
FULL = dict(n_kv_head=2, qk_norm=True, head_dim=24, rope_scaling=LLAMA3, rope_theta=500000.0)


def _randomise_norms(model: Transformer) -> Transformer:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    return model


def test_old_checkpoint_config_dicts_still_load():
    """A `to_dict()` saved before head_dim/qk_norm/rope_scaling existed rebuilds the same model."""
    old = {k: v for k, v in ModelConfig.from_name("demo").to_dict().items()
           if k not in ("head_dim", "qk_norm", "rope_scaling")}
    config = ModelConfig.from_dict(old)
    assert config == ModelConfig.from_name("demo")
    assert (config.head_dim, config.qk_norm, config.rope_scaling) == (32, False, None)
    # derived fields follow overrides of a preset
    assert ModelConfig.from_name("tiny", d_model=128).head_dim == 32


def test_explicit_head_dim_and_qk_norm_shapes():
    model = tiny(**FULL)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (4 * 24, 64) and attn.k_proj.weight.shape == (2 * 24, 64)
    assert attn.o_proj.weight.shape == (64, 4 * 24)
    assert attn.q_norm.weight.shape == (24,) and attn.k_norm.weight.shape == (24,)
    assert "blocks.0.attn.q_norm.weight" in model.state_dict()
    assert tiny().blocks[0].attn.q_norm is None and "blocks.0.attn.q_norm.weight" not in tiny().state_dict()
    assert model(torch.randint(0, 512, (2, 9))).shape == (2, 9, 512)


def test_llama3_scaling_changes_only_low_frequencies():
    from llmstages.model.transformer import rope_frequencies

    plain = rope_frequencies(64, 500000.0)
    scaled = rope_frequencies(64, 500000.0, {**LLAMA3, "original_max_position_embeddings": 8192})
    wavelen = 2 * math.pi / plain
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert torch.equal(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8.0)
    middle = ~high & ~low
    assert middle.any() and bool(((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8)).all())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "unsupported rope_type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "missing.*low_freq_factor"),
        ({"rope_scaling": {**LLAMA3, "low_freq_factor": 5.0}}, "high_freq_factor must exceed"),
        ({"head_dim": 0}, "head_dim must be a positive integer"),
        ({"d_model": 66, "n_head": 4, "head_dim": 15}, "head size 15 must be even"),
    ],
)
def test_bad_new_fields_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_name("tiny", **overrides)


# ---------------------------------------------------------------- KV cache


@torch.no_grad()
def test_cached_chunks_equal_one_full_forward():
    model = _randomise_norms(tiny(**FULL))
    ids = torch.randint(0, 512, (2, 20))
    full = model(ids)
    cache = model.new_cache(20)
    pieces = [model(ids[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 13), (13, 20)]]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_batch_with_mask_equals_rows_alone():
    model = _randomise_norms(tiny(**FULL))
    rows = [torch.randint(0, 512, (n,)) for n in (9, 4, 6)]
    width = 9
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    batched = model(ids, position_ids=positions, attention_mask=mask)
    assert torch.isfinite(batched).all()  # padding rows attend to themselves: no NaN
    # and through the cache: prefill, then one more token per row
    cache = model.new_cache(width + 1)
    model(ids, position_ids=positions, attention_mask=mask, cache=cache)
    nxt = torch.randint(0, 512, (3, 1))
    stepped = model(nxt, position_ids=positions[:, -1:] + 1, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                    cache=cache)
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, nxt[i]])[None])
        torch.testing.assert_close(batched[i, width - len(row):], alone[0, :-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stepped[i, 0], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_cache_misuse_is_an_error():
    model = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model.new_cache(17)
    cache = model.new_cache(8)
    with pytest.raises(ValueError, match="KVCache holds 8 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="document_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), document_ids=torch.zeros(1, 4, dtype=torch.long),
              cache=model.new_cache(8))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))


# ---------------------------------------------------------------- activation checkpointing, torch.compile


def _loss_and_grads(model: Transformer, ids: torch.Tensor, docs: torch.Tensor | None = None):
    model.zero_grad()
    logits = model(ids, document_ids=docs)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_equal_loss_and_gradients():
    model = _randomise_norms(tiny(**FULL)).train()
    ids = torch.randint(0, 512, (2, 16))
    docs = torch.tensor([[0] * 9 + [1] * 7, [0] * 16])
    plain_loss, plain_grads = _loss_and_grads(model, ids, docs)
    model.activation_checkpointing = True
    ckpt_loss, ckpt_grads = _loss_and_grads(model, ids, docs)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # the blocks really are recomputed: the forward of a block runs twice per step
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    _loss_and_grads(model, ids)
    assert len(calls) == 2


@pytest.mark.slow
def test_compiled_model_gives_equal_loss_and_gradients():
    """`model.compile()` (in place: parameter names unchanged) on CPU, with and without checkpointing."""
    model = _randomise_norms(tiny(**FULL)).train()
    ids = torch.randint(0, 512, (2, 16))
    eager_loss, eager_grads = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    model.compile()
    assert "blocks.0.attn.q_proj.weight" in model.state_dict()
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        loss, grads = _loss_and_grads(model, ids)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
