"""Backbone behaviour: causality, document isolation, GQA, config errors, counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmstages.model import ModelConfig, Transformer
from llmstages.model.transformer import apply_rope, positions_from_documents, rope_angles


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
