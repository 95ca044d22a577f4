"""Attention for packed rows: causal inside each document, nothing across documents.

Design choices:
- Three implementations of the same mask, one chosen per forward from the
  tensors' device (`packed_rows`); outputs and gradients agree (tests):
  - `spans` (CPU): causal SDPA on each document's slice of q, k, v, outputs
    concatenated back. It costs sum(length^2), not T^2, and allocates nothing
    quadratic in the row; as fast as the dense mask or several times faster
    in every row measured (`benchmarks/results/packed_attention.md`). Finding
    the documents reads `document_ids` on the host, once per forward.
  - `flex` (CUDA): FlexAttention with a block mask built from `document_ids`
    on the device: fully masked blocks are skipped, so it also costs about
    sum(length^2), with no host sync and one fused kernel. PyTorch has no
    FlexAttention backward on CPU, so the CPU tests check its forward.
  - `dense`: the `[B, 1, T, T]` block-diagonal mask through SDPA, the
    reference the tests compare the others with (cost T^2 whatever the documents).
- Padding (document id -1, always one run at the end of a row) attends
  causally to padding, so no query row is empty (no NaN).
"""

from __future__ import annotations

from functools import cache
from importlib.util import find_spec
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PackedAttention = Literal["auto", "spans", "flex", "dense"]


def document_mask(document_ids: Tensor) -> Tensor:
    """Boolean attention mask `[B, 1, T, T]`: causal, and only inside one document (the reference)."""
    length = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal)[:, None]


class DocumentSpans:
    """The documents of packed rows: per row, the lengths of the runs of equal `document_ids`.

    The packer writes every document (and the trailing padding, -1) as one
    contiguous run, so runs are documents.
    """

    def __init__(self, document_ids: Tensor) -> None:
        ids = document_ids.cpu()
        batch, length = ids.shape
        starts = torch.ones(batch, length, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        self.lengths: list[list[int]] = []
        for row in starts:
            edges = [*row.nonzero().flatten().tolist(), length]
            self.lengths.append([b - a for a, b in zip(edges, edges[1:])])

    def attention(self, q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> Tensor:
        """Causal attention inside each document of `q`, `k`, `v` `[B, H, T, D]`.

        `unbind` and `split` return views whose backward is one `stack`/`cat`,
        so the backward pass allocates no full-size zeros per document. Each
        document goes in as a 4-D `[1, H, L, D]` view: with 3-D inputs the CPU
        kernel falls back to one that materialises the `[L, L]` scores (3.5x
        slower, measured on 1800-token documents).
        """
        rows = []
        for qr, kr, vr, lengths in zip(q.unbind(0), k.unbind(0), v.unbind(0), self.lengths):
            parts = [
                F.scaled_dot_product_attention(qd[None], kd[None], vd[None], is_causal=True, enable_gqa=enable_gqa)[0]
                for qd, kd, vd in zip(qr.split(lengths, 1), kr.split(lengths, 1), vr.split(lengths, 1))
            ]
            rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        return torch.stack(rows)


@cache
def has_triton() -> bool:
    """Whether Triton (which compiles FlexAttention's CUDA kernel) is installed; looked up once, not per forward."""
    return find_spec("triton") is not None


@cache
def compiled_flex_attention():
    """`flex_attention` compiled once per process (uncompiled it materialises the full scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class DocumentBlockMask:
    """FlexAttention's block mask of packed rows, built once per forward and shared by every layer."""

    def __init__(self, document_ids: Tensor) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        ids = document_ids

        def same_document_causal(b, h, q_index, kv_index):
            return (ids[b, q_index] == ids[b, kv_index]) & (q_index >= kv_index)

        batch, length = ids.shape
        self.block_mask = create_block_mask(same_document_causal, batch, None, length, length, device=ids.device)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> Tensor:
        return compiled_flex_attention()(q, k, v, block_mask=self.block_mask, enable_gqa=enable_gqa)


PackedRows = DocumentSpans | DocumentBlockMask


def packed_rows(document_ids: Tensor, how: PackedAttention = "auto") -> PackedRows | Tensor:
    """What a packed batch's attention runs with: `auto` is `flex` on CUDA (where Triton, which
    compiles its kernel, is installed) and `spans` elsewhere; `dense` returns the reference mask tensor."""
    if how == "auto":
        how = "flex" if document_ids.is_cuda and has_triton() else "spans"
    if how == "dense":
        return document_mask(document_ids)
    if how == "flex":
        return DocumentBlockMask(document_ids)
    if how == "spans":
        return DocumentSpans(document_ids)
    raise ValueError(f"unknown packed attention {how!r}; choose one of: auto, spans, flex, dense")
