"""The train step as `llmstages fit` runs it vs the same step in a bare loop (issue #25).

`llmstages fit` with the shipped `configs/pretrain.yaml` (its callbacks,
logger, gradient clipping, LR schedule, progress output), changed only to
the 25M shape of `benchmarks.throughput` (batch 4 x 512, packed documents
from real text, a 32,000-token BPE trained on that text), runs in this
process. A callback (`PairedBareStep`) copies the backbone when training
starts and, at the start of every CLI step, steps the copy in a bare loop on
the batch the CLI step is about to get: forward, `token_logps` +
`reduce_token_loss` (the stage's loss, `normalize: token`), backward,
`clip_grad_norm_` at the config's 1.0, AdamW with the module's parameter
groups and hyper-parameters, the module's LR schedule, `zero_grad`. Both start
from the same weights and see the same batches, so their losses stay equal
(reported). What the CLI step adds is only what runs around that maths.

A CLI step is the process CPU time from the end of the bare step to the start
of the next batch's bare step: the whole loop iteration as Lightning runs it
(training_step and its logging, backward, the hooks, clipping, the optimiser,
the scheduler, progress output, the checkpoint check and fetching the next
batch). Bare and CLI steps alternate one to one; the first `--warmup` pairs
are dropped. Hook boundaries split both into phases (where the difference goes).

With `--precision bf16-mixed` (the shipped `configs/fragments/bf16.yaml`) each
round also steps a bare `transformers` `LlamaForCausalLM` (same weights, SDPA,
bf16 autocast, given the packed rows' equivalent 4D block-diagonal mask and
position ids, the same optimiser, clipping and schedule) and times a 1024 x 1024
bf16 matmul, the rate MFU is stated against.

    python -m benchmarks.cli_step                 # float32 and bf16-mixed, 25M shape
    python -m benchmarks.cli_step --quick         # tiny shape, smoke run into a temp folder
"""

from __future__ import annotations

import copy
import importlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import ROOT, SHARED_DATA, Report, base_parser, med_range, output_dir, set_threads
from benchmarks.throughput import SHAPES, build_hf, matmul_candidate

from llmstages.data.tokenizer import Tokenizer
from llmstages.losses import reduce_token_loss, token_logps
from llmstages.model.transformer import document_mask

CLOCK = time.process_time
TEXT_FILES = ("llamafactory/wiki_demo.txt", "llamafactory/c4_demo.jsonl")
PHASES = ("forward + loss", "backward", "grad norm, checks, clip, AdamW", "bookkeeping and next batch")


class BareLoop:
    """A model stepped by hand: loss, backward, clip, AdamW, LR schedule, zero_grad, each phase timed."""

    def __init__(self, model, loss_fn, optimizer, schedule, clip: float, autocast) -> None:
        self.model, self.loss_fn, self.optimizer, self.clip, self.autocast = model, loss_fn, optimizer, clip, autocast
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.seconds: list[float] = []
        self.phases: list[list[float]] = []
        self.losses: list[float] = []

    def step(self, batch: dict) -> None:
        t0 = CLOCK()
        with self.autocast():
            loss = self.loss_fn(self.model, batch)
        t1 = CLOCK()
        loss.backward()
        t2 = CLOCK()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = CLOCK()
        self.seconds.append(t3 - t0)
        self.phases.append([t1 - t0, t2 - t1, t3 - t2, 0.0])
        self.losses.append(float(loss.detach()))


def ours_loss(chunk_size: int):
    def loss_fn(model, batch):
        labels = batch["labels"]
        head = lambda hidden, weight: token_logps(hidden, weight, labels, chunk_size=chunk_size)  # noqa: E731
        logps = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                      document_ids=batch.get("document_ids"), head=head)
        return reduce_token_loss(-logps, labels, normalize="token", document_ids=batch.get("document_ids"))

    return loss_fn


def hf_loss(model, batch):
    # the 4D block-diagonal mask the model uses as its reference path: what `document_ids` means
    mask = document_mask(batch["document_ids"]) if "document_ids" in batch else None
    # our IGNORE_INDEX is transformers' -100, and both shift labels the same way
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch.get("position_ids"),
                 labels=batch["labels"]).loss


def module_optimizer(params_by_name, lr: float, weight_decay: float, betas) -> torch.optim.AdamW:
    """AdamW grouped as `StageModule.configure_optimizers` groups (no decay on norms, biases, embeddings)."""
    decay, no_decay = [], []
    for name, param in params_by_name:
        (no_decay if param.ndim < 2 or "embed" in name or "norm" in name else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=tuple(betas))


class PairedBareStep(Callback):
    """Steps bare copies of the CLI's model on each CLI batch, and times both by phase."""

    def __init__(self, transformers: bool = False, matmul: bool = False, chunk_size: int = 1024) -> None:
        self.with_hf, self.with_matmul, self.chunk_size = transformers, matmul, chunk_size
        self.cli_seconds: list[float] = []
        self.cli_phases: list[list[float]] = []
        self.cli_losses: list[float] = []
        self.matmul_seconds: list[float] = []
        self.loops: dict[str, BareLoop] = {}
        self._mark: float | None = None
        self._phase: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        hp = pl_module.hparams
        schedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
        clip = float(trainer.gradient_clip_val)
        autocast = trainer.precision_plugin.forward_context
        bare = copy.deepcopy(pl_module.backbone)
        self.loops["bare llmstages"] = BareLoop(
            bare, ours_loss(self.chunk_size), module_optimizer(bare.named_parameters(), hp.lr, hp.weight_decay, hp.betas),
            schedule, clip, autocast,
        )
        if self.with_hf:
            hf = build_hf(bare, "cpu")
            self.loops["bare transformers"] = BareLoop(
                hf, hf_loss, module_optimizer(hf.named_parameters(), hp.lr, hp.weight_decay, hp.betas),
                schedule, clip, autocast,
            )
        if self.with_matmul:
            self._matmul, self.matmul_flops = matmul_candidate("cpu", torch.bfloat16, 1024)
        self.threads = torch.get_num_threads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = CLOCK()
        if self._mark is not None:
            self.cli_seconds.append(now - self._mark)
            self._phase.append(now)
            self.cli_phases.append([b - a for a, b in zip(self._phase, self._phase[1:])])
        names = list(self.loops) + (["matmul"] if self.with_matmul else [])
        shift = len(self.cli_seconds) % len(names)  # the starting candidate rotates
        for name in names[shift:] + names[:shift]:
            if name == "matmul":
                start = CLOCK()
                self._matmul()
                self.matmul_seconds.append(CLOCK() - start)
            else:
                self.loops[name].step(batch)
        self._mark = CLOCK()
        self._phase = [self._mark]

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._phase.append(CLOCK())
        self.cli_losses.append(float(loss.detach()))

    def on_after_backward(self, trainer, pl_module) -> None:
        self._phase.append(CLOCK())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._phase.append(CLOCK())


def bpe_tokenizer(folder: Path, vocab_size: int) -> Path:
    files = [SHARED_DATA / f for f in TEXT_FILES]
    tokenizer = Tokenizer.train_from_files(files, vocab_size, min_frequency=1, show_progress=False)
    if tokenizer.vocab_size != vocab_size:
        raise SystemExit(f"the BPE trained on {TEXT_FILES} has {tokenizer.vocab_size} tokens, not {vocab_size}")
    return tokenizer.save(folder / "tokenizer")


def run_cli(shape, precision: str, steps: int, folder: Path, tokenizer: Path, callback_args: dict) -> PairedBareStep:
    from llmstages.trainer_cli import lightning_cli

    model = {"d_model": shape.d_model, "n_layer": shape.n_layer, "n_head": shape.n_head,
             "n_kv_head": shape.n_kv_head, "d_mlp": shape.d_mlp, "max_seq_len": shape.seq}
    args = ["fit", "--config", str(ROOT / "configs" / "pretrain.yaml")]
    if precision == "bf16-mixed":
        args += ["--config", str(ROOT / "configs" / "fragments" / "bf16.yaml")]
    args += [
        "--trainer.default_root_dir", str(folder / "runs"), "--run_name", precision,
        "--trainer.max_steps", str(steps),
        "--model.init_args.model", json.dumps(model),
        "--data.init_args.files", json.dumps([str(SHARED_DATA / f) for f in TEXT_FILES]),
        "--data.init_args.tokenizer", str(tokenizer),
        "--data.init_args.batch_size", str(shape.batch), "--data.init_args.seq_len", str(shape.seq),
        "--data.init_args.cache_dir", str(folder / "cache"),
        "--trainer.callbacks+", json.dumps({"class_path": "benchmarks.cli_step.PairedBareStep", "init_args": callback_args}),
    ]
    cli = lightning_cli(args)
    # the CLI instantiates the class of the importable module, not this `__main__` copy
    loaded = importlib.import_module("benchmarks.cli_step").PairedBareStep
    return next(c for c in cli.trainer.callbacks if isinstance(c, loaded))


def phase_rows(label: str, phases: list[list[float]]) -> list[str]:
    columns = list(zip(*phases))
    return [label, *(f"{statistics.median(c) * 1000:,.0f}" for c in columns), f"{statistics.median(map(sum, phases)) * 1000:,.0f}"]


def main() -> None:
    parser = base_parser(__doc__, default_repeats=8)
    parser.set_defaults(threads=1, warmup=2)
    parser.add_argument("--precisions", nargs="+", choices=("32-true", "bf16-mixed"), default=["32-true", "bf16-mixed"])
    parser.add_argument("--shape", default=None, choices=list(SHAPES), help="model shape (default 25m; quick with --quick)")
    args = parser.parse_args()
    set_threads(args)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), 1
    shape_name = args.shape or ("quick" if args.quick else "25m")
    shape = SHAPES[shape_name]
    out = output_dir(args)
    report = Report("cli_step", "The train step through `llmstages fit` vs the same step in a bare loop", args)
    summary, absolute, phases, losses = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="llmstages-cli-step-") as tmp:
        tokenizer = bpe_tokenizer(Path(tmp), shape.vocab)
        for precision in args.precisions:
            bf16 = precision == "bf16-mixed"
            paired = run_cli(shape, precision, args.warmup + args.repeats + 1, Path(tmp), tokenizer,
                             {"transformers": bf16, "matmul": bf16})
            drop = args.warmup
            cli = paired.cli_seconds[drop:]
            rounds = len(cli)
            loops = {name: loop.seconds[drop:drop + rounds] for name, loop in paired.loops.items()}
            tokens = shape.batch * shape.seq
            bare = loops["bare llmstages"]
            ratio = [b / c for b, c in zip(bare, cli)]  # CLI tokens/s over bare tokens/s
            verdict = "met" if statistics.median(ratio) >= 0.95 else "missed"
            summary.append([precision, "CLI step / bare llmstages step", med_range(ratio, "{:.3f}"), "≥ 0.95", verdict])
            flops_token = paired.loops["bare llmstages"].model.flops_per_token(shape.seq)
            matmul_rate = ([paired.matmul_flops / s for s in paired.matmul_seconds[drop:drop + rounds]]
                           if paired.matmul_seconds else None)
            timings = {"CLI (llmstages fit)": cli, **loops}
            for name, seconds in timings.items():
                rates = [tokens / s for s in seconds]
                mfu = (med_range([r * flops_token / m * 100 for r, m in zip(rates, matmul_rate)], "{:.0f}")
                       if matmul_rate else "")
                absolute.append([precision, name, med_range(rates, "{:,.0f}"), mfu])
            if "bare transformers" in loops:
                over_hf = [h / c for h, c in zip(loops["bare transformers"], cli)]
                verdict = "met" if statistics.median(over_hf) >= 1.3 else "missed"
                summary.append([precision, "CLI step / bare transformers bf16 autocast step", med_range(over_hf, "{:.2f}"),
                                "≥ 1.30", verdict])
            if matmul_rate:
                absolute.append([precision, "matmul 1024×1024 bf16 (GFLOP/s)", med_range([r / 1e9 for r in matmul_rate], "{:.1f}"),
                                 "100 (reference)"])
            phases.append(phase_rows(f"{precision} CLI", paired.cli_phases[drop:]))
            for name, loop in paired.loops.items():
                phases.append(phase_rows(f"{precision} {name}", loop.phases[drop:drop + rounds]))
            last = min(len(paired.cli_losses), len(paired.loops["bare llmstages"].losses)) - 1
            losses.append([precision, f"{paired.cli_losses[0]:.5f}", f"{paired.loops['bare llmstages'].losses[0]:.5f}",
                           *([f"{paired.loops['bare transformers'].losses[0]:.5f}"] if bf16 else ["—"]),
                           f"{paired.cli_losses[last]:.5f}", f"{paired.loops['bare llmstages'].losses[last]:.5f}",
                           f"{last + 1}", str(paired.threads)])

    report.text(
        f"`llmstages fit --config configs/pretrain.yaml` (float32; bf16-mixed adds `configs/fragments/bf16.yaml`), "
        f"in this process, at the `{shape_name}` shape of throughput.md (d_model {shape.d_model}, {shape.n_layer} layers, "
        f"{shape.n_head} heads, seq {shape.seq}, batch {shape.batch}, vocab {shape.vocab}: a BPE trained on "
        f"{', '.join(TEXT_FILES)}, which are also the packed training documents). The shipped callbacks, logger "
        "(W&B offline), gradient clipping 1.0, warm-up + cosine LR and progress output all run; validation "
        "(every 100 steps) and the periodic checkpoint (every 100 steps) do not fall within the measured steps. "
        "Each CLI step is paired with a bare step of a copy of the same model on the same batch (see the module "
        f"docstring of `benchmarks/cli_step.py`); {args.warmup} warm-up pairs dropped, {args.repeats} timed. "
        "One torch thread, process CPU time (4 other engineers and other benchmarks share the 2 cores); "
        "ratios are per pair, median (min–max)."
    )
    report.text("## Ratios (tokens/s of the CLI step over the other)")
    report.table(["precision", "ratio", "median (min–max)", "target", "verdict"], summary)
    report.text(
        "## Absolute numbers (context)\n\nMFU (bf16 run) = tokens/s × FLOPs per token (`Transformer.flops_per_token`) "
        "/ the rate of a 1024×1024 bf16 matmul timed in the same rounds."
    )
    report.table(["precision", "candidate", "tokens/s median (min–max)", "MFU % vs bf16 matmul"], absolute)
    report.text(
        "## Where the time goes: median ms per phase\n\nThe CLI step's phases are cut at its hooks: "
        "batch start → `on_before_backward` (training_step: forward, loss, its stats and `self.log` calls, "
        "zero_grad), → `on_after_backward` (backward), → `on_train_batch_end` (the `on_before_optimizer_step` "
        "hooks: step loss, grad norm, non-finite check; clipping; AdamW), → the next batch start (scheduler, "
        "logging, progress, checkpoint check, fetching the batch). The bare loop's last phase is empty: its "
        "scheduler step is timed with AdamW and its batch is handed to it."
    )
    report.table(["run", *PHASES, "total"], phases)
    report.text("## Same training (the CLI and its bare copy see the same batches from the same weights)")
    report.table(["precision", "CLI loss step 1", "bare loss step 1", "transformers loss step 1", "CLI loss last",
                  "bare loss last", "steps", "torch threads in the run"], losses)
    report.write(out)


if __name__ == "__main__":
    main()
