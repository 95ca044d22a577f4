"""Train-step throughput: llmstages' backbone + chunked loss vs transformers and LitGPT.

One step is forward + loss + backward + AdamW on one micro-batch, in the
same process, on the same random token batches, from the same weights
(transformers' model gets ours through `llmstages.model.hf`), with the same
optimiser (AdamW, one parameter group, identical hyper-parameters and
foreach/fused setting). The candidates run round-robin (see
`benchmarks/common.py`); the report gives tokens/s, the per-round ratio
against each competitor (median and min-max), model FLOPs utilisation
against this machine's float32 matmul rate measured in the same run, and a
`torch.profiler` breakdown of one llmstages step.

- llmstages: `Transformer` with a head calling `losses.token_logps` (what
  `StageModule.token_logps` does) and `losses.reduce_token_loss`.
- transformers: `LlamaForCausalLM`, `attn_implementation="sdpa"`, `labels=`.
- LitGPT: `litgpt.model.GPT` (fused QKV, LLaMAMLP, RMSNorm) with
  `litgpt.utils.chunked_cross_entropy`, as its pretraining loop does.
  litgpt is never a project dependency: install it into a folder of its own
  (`pip install --no-deps litgpt psutil --target DIR`) and pass
  `--litgpt-path DIR`; without it the LitGPT column is skipped with a note.

Packed rows' attention (per document vs the dense mask) is compared in
`benchmarks.packed_attention`, bf16-mixed vs float32 in `benchmarks.bf16`.

    python -m benchmarks.throughput                    # 5M and 25M shapes, ~15 min on 2 cores
    python -m benchmarks.throughput --quick            # smoke run, < 2 min, report in a temp folder
    python -m benchmarks.throughput --litgpt-path .cache/bench-litgpt
    python -m benchmarks.throughput --device cuda --precision bf16-mixed --compile --shapes 124m 1b
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import Report, alternate, base_parser, med_range, output_dir, paired_ratios, set_threads

from llmstages.losses import DEFAULT_CHUNK_SIZE, reduce_token_loss, token_logps
from llmstages.model.config import ModelConfig
from llmstages.model.transformer import Transformer


@dataclass(frozen=True)
class Shape:
    vocab: int
    d_model: int
    n_layer: int
    n_head: int
    seq: int
    batch: int
    n_kv_head: int | None = None
    d_mlp: int | None = None

    def config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab, d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head,
            n_kv_head=self.n_kv_head, d_mlp=self.d_mlp, max_seq_len=self.seq,
        )


SHAPES = {
    "quick": Shape(vocab=2048, d_model=128, n_layer=2, n_head=2, seq=128, batch=4),
    # the two CPU shapes; the 25M one keeps 2048 tokens per step like the 5M one
    "5m": Shape(vocab=8192, d_model=256, n_layer=4, n_head=4, seq=256, batch=8),
    "25m": Shape(vocab=32000, d_model=512, n_layer=8, n_head=8, seq=512, batch=4),
    # GPU shapes (target 7), the presets of the same names
    "124m": Shape(vocab=50304, d_model=768, n_layer=12, n_head=12, seq=1024, batch=8, d_mlp=2048),
    "1b": Shape(vocab=128256, d_model=2048, n_layer=16, n_head=32, n_kv_head=8, seq=2048, batch=4, d_mlp=8192),
}

OPTIMISER = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)


# --------------------------------------------------------------------------- the three models


class Candidate:
    """A model, its AdamW and one training step on a batch `(input_ids, labels)`."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn, adamw: str, autocast) -> None:
        self.name, self.model, self.loss_fn, self.autocast = name, model, loss_fn, autocast
        kwargs = {"foreach": adamw == "foreach", "fused": adamw == "fused"} if adamw != "default" else {}
        self.optimizer = torch.optim.AdamW(model.parameters(), **OPTIMISER, **kwargs)
        self.last_loss = float("nan")

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        input_ids, labels = batch
        with self.autocast():
            loss = self.loss_fn(self.model, input_ids, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()


def ours_loss(chunk_size: int, recompute: bool = True):
    """The loss as `StageModule.token_logps` + `reduce_token_loss` compute it."""
    def loss_fn(model, input_ids, labels):
        head = lambda hidden, weight: token_logps(  # noqa: E731
            hidden, weight, labels, chunk_size=chunk_size, recompute=recompute
        )
        logps = model(input_ids, head=head)
        return reduce_token_loss(-logps, labels)

    loss_fn.chunk_size = chunk_size
    return loss_fn


def build_ours(config: ModelConfig, device: str, compile_model: bool) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    if compile_model:
        compile_blocks(model)
    return model


def compile_blocks(model: Transformer) -> None:
    """`torch.compile` each block in place (parameter names unchanged; identical blocks share one graph).

    The chunked loss stays eager: it loops over chunks and checks label ids on the host.
    """
    for block in model.blocks:
        block.compile()


def build_hf(ours: Transformer, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmstages.model.hf import config_to_hf, state_dict_to_hf

    hf_dict = config_to_hf(ours.config, architecture="llama")
    config = LlamaConfig(**{k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type")})
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(device)
    state = state_dict_to_hf(ours.state_dict(), ours.config, architecture="llama")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"transformers model: missing {missing}, unexpected {unexpected}")
    model.train()
    return model


def hf_loss(model, input_ids, labels):
    return model(input_ids=input_ids, labels=labels).loss


def import_litgpt(path: Path | None) -> str | None:
    """Put a separately installed litgpt on sys.path; the reason it is unusable, or None."""
    if path is not None:
        if not path.is_dir():
            return f"--litgpt-path {path} is not a folder"
        sys.path.insert(0, str(path))
    try:
        import litgpt.model  # noqa: F401
        import litgpt.utils  # noqa: F401
    except ImportError as error:
        return f"litgpt is not importable ({error}); install it with `pip install --no-deps litgpt psutil --target DIR` and pass --litgpt-path DIR"
    return None


def build_litgpt(ours: Transformer, device: str):
    from litgpt.config import Config
    from litgpt.model import GPT

    cfg = ours.config
    config = Config(
        name="llmstages-shape", block_size=cfg.max_seq_len, vocab_size=cfg.vocab_size, padded_vocab_size=cfg.vocab_size,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_query_groups=cfg.n_kv_head, n_embd=cfg.d_model,
        intermediate_size=cfg.d_mlp, head_size=cfg.head_dim, rotary_percentage=1.0, parallel_residual=False,
        bias=False, norm_class_name="RMSNorm", norm_eps=cfg.norm_eps, mlp_class_name="LLaMAMLP",
        rope_base=int(cfg.rope_theta),
    )
    model = GPT(config)
    model.lm_head.weight = model.transformer.wte.weight  # tied, as ours and the transformers model are
    model.load_state_dict(litgpt_state(ours), strict=True)
    model = model.to(device)
    model.max_seq_length = cfg.max_seq_len
    model.train()
    return model


def litgpt_state(ours: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under LitGPT's names (fused QKV laid out as [all q; all k; all v])."""
    sd = ours.state_dict()
    out = {"transformer.wte.weight": sd["embed.weight"], "lm_head.weight": sd["embed.weight"],
           "transformer.ln_f.weight": sd["norm.weight"]}
    for i in range(ours.config.n_layer):
        b, o = f"blocks.{i}.", f"transformer.h.{i}."
        out[o + "norm_1.weight"] = sd[b + "attn_norm.weight"]
        out[o + "norm_2.weight"] = sd[b + "mlp_norm.weight"]
        out[o + "attn.qkv.weight"] = torch.cat([sd[b + f"attn.{p}_proj.weight"] for p in "qkv"])
        out[o + "attn.proj.weight"] = sd[b + "attn.o_proj.weight"]
        out[o + "mlp.fc_1.weight"] = sd[b + "mlp.gate_proj.weight"]
        out[o + "mlp.fc_2.weight"] = sd[b + "mlp.up_proj.weight"]
        out[o + "mlp.proj.weight"] = sd[b + "mlp.down_proj.weight"]
    return {k: v.clone() for k, v in out.items()}


def litgpt_loss(model, input_ids, labels):
    from litgpt.utils import chunked_cross_entropy

    logits = model(input_ids)
    return chunked_cross_entropy(logits[:, :-1], labels[:, 1:])


# --------------------------------------------------------------------------- matmul rate


def matmul_candidate(device: str, dtype: torch.dtype, n: int):
    """A timed candidate doing one `n x n` matmul per call, and the FLOPs of a call.

    Run in the same alternation as the models, so the rate MFU is measured
    against saw the same machine load and the same clock.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    repeats = 8 if device == "cpu" else 50

    def run():
        for _ in range(repeats):
            a @ b

    return run, 2.0 * n**3 * repeats


# --------------------------------------------------------------------------- profile


CATEGORIES = ("embedding", "attention", "mlp", "head+loss", "optimizer", "data", "other")


def profile_breakdown(model: Transformer, loss_fn, optimizer, make_batch, autocast) -> dict[str, float]:
    """Self CPU time (ms) of one step by category, backward ops attributed to their forward's module.

    Forward ops are tagged through module hooks (record_function ranges);
    each backward node inherits the tag of the forward op with the same
    autograd sequence number.
    """
    from torch.autograd.profiler import record_function

    ranges: list = []
    handles = []

    def tag(module: torch.nn.Module, label: str) -> None:
        def pre(*_):
            ranges.append(record_function(f"bench::{label}"))
            ranges[-1].__enter__()

        def post(*_):
            ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    tag(model.embed, "embedding")
    for block in model.blocks:
        tag(block.attn_norm, "attention")
        tag(block.attn, "attention")
        tag(block.mlp_norm, "mlp")
        tag(block.mlp, "mlp")
    tag(model.norm, "head+loss")

    def tagged_loss(m, input_ids, labels):
        def head(hidden, weight):
            with record_function("bench::head+loss"):
                return token_logps(hidden, weight, labels, chunk_size=loss_fn.chunk_size)

        logps = m(input_ids, head=head)
        with record_function("bench::head+loss"):
            return reduce_token_loss(-logps, labels)

    try:
        for _ in range(2):  # warm-up outside the profiler
            _profiled_step(model, tagged_loss, optimizer, make_batch, autocast, contextlib.nullcontext)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _profiled_step(model, tagged_loss, optimizer, make_batch, autocast, record_function)
    finally:
        for handle in handles:
            handle.remove()
    return _categorise(prof.events())


def _profiled_step(model, loss_fn, optimizer, make_batch, autocast, rf) -> None:
    named = (lambda label: rf(f"bench::{label}")) if rf is not contextlib.nullcontext else (lambda label: rf())
    with named("data"):
        input_ids, labels = make_batch()
    with autocast():
        loss = loss_fn(model, input_ids, labels)
    loss.backward()
    with named("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _categorise(events) -> dict[str, float]:
    def label_of(event) -> str | None:
        node = event
        while node is not None:
            if node.name.startswith("bench::"):
                return node.name.removeprefix("bench::")
            node = node.cpu_parent
        return None

    seq_label: dict[int, str] = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            label = label_of(event)
            if label is not None:
                seq_label.setdefault(event.sequence_nr, label)
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name.startswith("bench::"):
            continue
        label = label_of(event)
        if label is None:
            # backward: the autograd node (or an op inside it) carries its forward's sequence number
            node = event
            while node is not None and label is None:
                if node.name.startswith("autograd::engine::evaluate_function") and node.sequence_nr >= 0:
                    label = seq_label.get(node.sequence_nr)
                node = node.cpu_parent
        totals[label or "other"] += event.self_cpu_time_total / 1000.0
    return {c: totals.get(c, 0.0) for c in CATEGORIES}


# --------------------------------------------------------------------------- variants of our step


def _rms_norm_fused(self, x):
    return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# No variant copies a model method: a copied `Attention.forward` (fused QKV, 0.95x of the baseline in the
# report of commit c079f1f) drifted from the real one once and was removed; variants are options of the real model.
VARIANTS = {
    f"baseline (AdamW foreach, chunk {DEFAULT_CHUNK_SIZE})": {},
    "loss recompute=False": {"recompute": False},
    "loss chunk 1024": {"chunk": 1024},
    "loss chunk 4096": {"chunk": 4096},
    "AdamW fused": {"adamw": "fused"},
    "AdamW for-loop": {"adamw": "for-loop"},
    "F.rms_norm": {"patch": {"RMSNorm": _rms_norm_fused}},
    "SDPA math backend": {"sdpa": "MATH"},
    "torch.compile (each block)": {"compile": True},
}


def variant_candidate(config: ModelConfig, spec: dict, device: str, autocast) -> Candidate:
    import types

    from llmstages.model import transformer as tmod

    torch.manual_seed(0)
    model = Transformer(config).to(device)
    for class_name, forward in spec.get("patch", {}).items():
        cls = getattr(tmod, class_name)
        for module in model.modules():
            if type(module) is cls:
                module.forward = types.MethodType(forward, module)
    if spec.get("compile"):
        compile_blocks(model)
    context = autocast
    if "sdpa" in spec:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, spec["sdpa"])

        @contextlib.contextmanager
        def context():
            with autocast(), sdpa_kernel(backend):
                yield

    loss_fn = ours_loss(spec.get("chunk", DEFAULT_CHUNK_SIZE), spec.get("recompute", True))
    return Candidate("variant", model, loss_fn, spec.get("adamw", "foreach"), context)


# --------------------------------------------------------------------------- main


def shape_line(name: str, shape: Shape, model: Transformer, steps: int) -> str:
    cfg = model.config
    return (
        f"- **{name}**: vocab {shape.vocab}, d_model {shape.d_model}, {shape.n_layer} layers, {shape.n_head} heads "
        f"({cfg.n_kv_head} kv), d_mlp {cfg.d_mlp}, seq {shape.seq}, batch {shape.batch}, tied embeddings; "
        f"{model.num_parameters() / 1e6:.1f}M parameters ({model.num_parameters(True) / 1e6:.1f}M without the "
        f"embedding); {model.flops_per_token(shape.seq) / 1e6:.1f} MFLOP per token (forward + backward); "
        f"{steps} step(s) per timed round"
    )


def make_batches(shape: Shape, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator) for _ in range(4)]
    return [(b.to(device), b.to(device)) for b in batches]  # labels = inputs: every position a target


def runner(candidate: Candidate, batches, steps: int):
    position = [0]

    def run():
        for _ in range(steps):
            position[0] += 1
            candidate.step(batches[position[0] % len(batches)])

    return run


def main() -> None:
    parser = base_parser(__doc__, default_repeats=7)
    parser.set_defaults(threads=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="cpu: process CPU time (default on CPU, robust to other work on shared cores; use one "
                             "thread); wall: wall clock (default on CUDA)")
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help="model shapes (default: 5m 25m; quick with --quick)")
    parser.add_argument("--steps", type=int, default=1, help="train steps per timed round")
    parser.add_argument("--adamw", choices=("default", "foreach", "fused", "for-loop"), default="foreach",
                        help="AdamW implementation, the same for every candidate")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="our loss's chunk size (default: the stages' default, llmstages.losses.DEFAULT_CHUNK_SIZE)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our blocks and the transformers and LitGPT models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32")
    parser.add_argument("--litgpt-path", type=Path, default=None, help="folder holding a separately installed litgpt")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers column")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="profile one llmstages step per shape (CPU, eager)")
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                        help="also time variants of our step (what was tried) on the first shape "
                             "(default: on for CPU; off for CUDA, where ten more models may not fit)")
    parser.add_argument("--name", default="throughput", help="report file name (without .md)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    args.clock = args.clock or ("wall" if cuda else "cpu")
    if args.variants is None:
        args.variants = not cuda
    if cuda:
        args.threads = None
    set_threads(args)
    shapes = args.shapes or (["quick"] if args.quick else ["5m", "25m"])
    if args.quick:
        args.repeats = min(args.repeats, 3)
    out = output_dir(args)
    device = args.device
    sync = torch.cuda.synchronize if cuda else None
    if args.precision == "bf16-mixed":
        autocast = lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    matmul_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32

    litgpt_problem = import_litgpt(args.litgpt_path)
    report = Report(args.name, "Train-step throughput: llmstages vs transformers and LitGPT", args,
                    extra_versions=() if litgpt_problem else ("litgpt",))
    shape_lines, summary_rows, detail_rows, profiles, variant_rows = [], [], [], {}, []
    for shape_index, shape_name in enumerate(shapes):
        shape = SHAPES[shape_name]
        config = shape.config()
        ours_model = plain = build_ours(config, device, args.compile)
        candidates = {
            "llmstages": Candidate("llmstages", ours_model, ours_loss(args.chunk_size), args.adamw, autocast),
            "llmstages recompute=False": Candidate(
                "llmstages recompute=False", build_ours(config, device, args.compile),
                ours_loss(args.chunk_size, recompute=False), args.adamw, autocast,
            ),
        }
        if not args.no_hf:
            hf = build_hf(plain, device)
            candidates["transformers"] = Candidate(
                "transformers", torch.compile(hf) if args.compile else hf, hf_loss, args.adamw, autocast
            )
        if litgpt_problem is None:
            lit = build_litgpt(plain, device)
            candidates["litgpt"] = Candidate(
                "litgpt", torch.compile(lit) if args.compile else lit, litgpt_loss, args.adamw, autocast
            )
        batches = make_batches(shape, device)
        # the same weights must give the same loss on the same batch: the candidates do the same work
        first_loss = {}
        for name, candidate in candidates.items():
            with torch.no_grad(), autocast():
                first_loss[name] = float(candidate.loss_fn(candidate.model, *batches[0]))
        compile_note = ""
        if args.compile:  # compile outside the timed rounds, and say what it cost
            for candidate in candidates.values():
                start = time.perf_counter()
                candidate.step(batches[0])
                compile_note += f"{candidate.name} first step {time.perf_counter() - start:.1f} s; "
        matmul_n = 1024 if device == "cpu" else 8192
        timed = {name: runner(c, batches, args.steps) for name, c in candidates.items()}
        timed["matmul"], matmul_flops = matmul_candidate(device, matmul_dtype, matmul_n)
        tokens = shape.batch * shape.seq * args.steps
        work = {name: float(tokens) for name in candidates} | {"matmul": matmul_flops}
        samples = alternate(timed, repeats=args.repeats, warmup=args.warmup, work=work, sync=sync, clock=args.clock)
        peak = statistics.median(samples["matmul"].rates())
        flops_token = plain.flops_per_token(shape.seq)
        for name in candidates:
            rates = samples[name].rates()
            mfu = [r * flops_token / peak * 100 for r in rates]
            detail_rows.append([
                shape_name, name, med_range(rates, "{:,.0f}"), med_range(mfu, "{:.0f}"),
                f"{first_loss[name]:.5f}", f"{float(candidates[name].last_loss):.4f}",
            ])
        detail_rows.append([shape_name, f"matmul {matmul_n}×{matmul_n} (GFLOP/s)",
                            med_range([r / 1e9 for r in samples["matmul"].rates()], "{:.1f}"), "100 (reference)", "", ""])
        for ours in ("llmstages", "llmstages recompute=False"):
            for other in [n for n in candidates if not n.startswith("llmstages")]:
                ratios = paired_ratios(samples[ours], samples[other])
                target = 1.25 if other == "transformers" else 1.0
                median = statistics.median(ratios)
                verdict = "met" if median >= target else f"missed by {(1 - median / target) * 100:.0f}%"
                summary_rows.append([shape_name, f"{ours} / {other}", med_range(ratios, "{:.2f}"), f"≥ {target:.2f}", verdict])
            if litgpt_problem is not None:
                summary_rows.append([shape_name, f"{ours} / litgpt", "skipped", "≥ 1.00", "litgpt not importable (see note)"])
        if args.profile and not cuda and not args.compile:
            profiles[shape_name] = profile_breakdown(
                plain, candidates["llmstages"].loss_fn, candidates["llmstages"].optimizer,
                lambda: batches[0], autocast,
            )
        shape_lines.append(shape_line(shape_name, shape, plain, args.steps) + (f"; compile: {compile_note}" if compile_note else ""))
        del candidates, samples, timed
        if args.variants and shape_index == 0:
            variant_rows = run_variants(config, batches, args, device, autocast, sync)

    report.text(
        "Forward + loss + backward + AdamW per step. Same weights (the transformers and LitGPT models get ours), "
        "same batches (random tokens, every position a target), "
        f"{'bfloat16 autocast' if args.precision == 'bf16-mixed' else 'float32'}, AdamW {OPTIMISER} "
        f"`{args.adamw}` for all, llmstages loss chunk size {args.chunk_size}. "
        f"Clock: {'process CPU time' if args.clock == 'cpu' else 'wall clock'}, torch threads {torch.get_num_threads()}"
        + (" (the 2 cores are shared with other sessions: CPU time of one thread leaves out the time the process "
           "waits for a core, which wall-clock ratios of 2-thread runs cannot; with 2 threads OpenMP's spinning "
           "would count as CPU time)" if args.clock == "cpu" else "")
        + ". Candidates run one after another each round (the starting one rotates); ratios are per round, "
          "median and min–max.\n\n" + "\n".join(shape_lines)
    )
    report.text("## Ratios (tokens/s of llmstages over the competitor)")
    report.table(["shape", "ratio", "median (min–max)", "target", "verdict"], summary_rows)
    report.text(
        "`llmstages` is the default (`StageModule`'s) loss path; `recompute=False` is `token_logps`'s opt-in "
        "that keeps the softmax for backward instead of redoing the output-layer matmul (more memory: one "
        "`[targets, vocab]` float32 tensor, as the plain logits path holds several)."
    )
    report.text(
        "## Absolute numbers (context)\n\nMFU = tokens/s × FLOPs per token (PaLM formula, "
        "`Transformer.flops_per_token`) / the rate of a 1024×1024 matmul measured in the same alternation. "
        "That matmul is a reference, not a ceiling: a larger shape's matmuls run faster than it, so its MFU reads high."
    )
    report.table(["shape", "candidate", "tokens/s median (min–max)", "MFU % median (min–max)", "loss at start",
                  "loss at end"], detail_rows)
    if litgpt_problem is not None:
        report.text(f"Note: LitGPT column skipped: {litgpt_problem}.")
    if variant_rows:
        report.text(
            f"## What was tried ({shapes[0]}): variants of our step, alternated with the baseline\n\n"
            "Each is one change to the llmstages candidate above; ratio of its tokens/s to the baseline's, per round. "
            "(The data part of the profile below is ~0: batches are prebuilt tensors; the data pipeline is measured "
            "in data_prep.md and packing_throughput.md.)"
        )
        report.table(["variant", "tokens/s median (min–max)", "ratio to baseline median (min–max)", "note"], variant_rows)
    for shape_name, breakdown in profiles.items():
        total = sum(breakdown.values())
        report.text(
            f"## Profile of one llmstages step ({shape_name})\n\n`torch.profiler`, self CPU time; backward ops "
            "are counted with the module whose forward created them (autograd sequence numbers). The profiler "
            f"times ops by the wall clock, so the machine's load inflates the total ({total:.0f} ms); compare shares. "
            "For scale: the output layer's 6·V·d FLOPs per token are "
            f"{profile_flops_share(shape_name):.0%} of the model's (before the chunked loss recomputes its matmul)."
        )
        report.table(["part", "ms", "share"], [[c, f"{v:.1f}", f"{v / total * 100:.0f}%"] for c, v in breakdown.items()])
    report.write(out)


def profile_flops_share(shape_name: str) -> float:
    config = SHAPES[shape_name].config()
    model_flops = Transformer(config).flops_per_token(config.max_seq_len)
    return 6.0 * config.vocab_size * config.d_model / model_flops


def run_variants(config, batches, args, device, autocast, sync) -> list[list[str]]:
    names = list(VARIANTS) if not args.quick else [n for n in VARIANTS if "compile" not in n]
    candidates, notes = {}, {}
    for name in names:
        candidate = variant_candidate(config, VARIANTS[name], device, autocast)
        start = time.perf_counter()
        candidate.step(batches[0])  # compiles, for the compiled variant
        if "compile" in name:
            notes[name] = f"first step (compilation) {time.perf_counter() - start:.0f} s"
        candidates[name] = candidate
    timed = {name: runner(c, batches, args.steps) for name, c in candidates.items()}
    tokens = batches[0][0].numel() * args.steps
    samples = alternate(timed, repeats=args.repeats, warmup=args.warmup, work=tokens, sync=sync, clock=args.clock)
    base = names[0]
    return [
        [name, med_range(samples[name].rates(), "{:,.0f}"), med_range(paired_ratios(samples[name], samples[base]), "{:.3f}"),
         notes.get(name, "")]
        for name in names
    ]


if __name__ == "__main__":
    main()
