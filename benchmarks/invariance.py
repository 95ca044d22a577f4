"""Trajectory invariance: whole runs, launched as users launch them, that must train identically.

Each case starts real `llmstages fit` runs (subprocesses of the console entry
point, CSV logger, a timeout that fails instead of hanging) from one
initialisation and one data order, for N optimiser steps, and compares every
run of an equivalence class with the class's reference run, step by step, on
`train/step_loss` (the step's loss over all its micro-batches and ranks) and
`train/grad_norm` (logged before clipping).

Classes (where they apply): batch split (8x1 = 4x2 = 1x8; for SFT also under
`normalize: sequence`, for GRPO under `dapo`, `dr_grpo` and `grpo`, whose
micro-batches here always hold equal numbers of completions, and for every newer GRPO loss type:
`cispo`, `sapo`, `luspo`, `vespo`), world size
(1 process x accumulation 4 = 2 DDP ranks x 2 = FSDP2 on 2 ranks), packing
(SFT `documents` = `none`), DPO reference (`precompute` = `live`, and with LoRA the
initial policy's log-probs = the policy with adapters disabled), model
switches (activation checkpointing on = off), `torch.compile` on = off (a looser
tolerance: fused kernels reorder float32 sums), resume (SIGKILL right after step
k's checkpoint, or SIGTERM inside step k's accumulation, which checkpoints at its
end: resume = uninterrupted, every step for the preempted run), streamed-pretraining
resume (`stream_resume`: the same kill and preemption on `StreamingPretrainData`, two shard
sources mixed 3:1 and shuffled, one process and 2 DDP ranks), and precision (`bf16-mixed` against
float32, and the batch split under `bf16-mixed`: reported as context, never pass/fail, because bf16
rounds every matmul and a split changes the shapes it rounds). GRPO runs start from a short SFT
run (a random model never stops, so every completion would be equally long)
and are rewarded for shorter completions.

Negative controls must fail their class by a wide margin: `normalize:
micro_batch`, DPO `legacy_mean_padded`, GRPO `bnpo` and KTO's TRL-style `kl_reference:
micro_batch` across the batch split,
and pretraining `packing: concat` against `documents`. A suite whose controls
pass is broken.

    python -m benchmarks.invariance                 # every stage and class, 30 steps
    python -m benchmarks.invariance --quick         # 2 stages, 2 classes, 5 steps (the test suite runs this)
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks.common import ROOT, Report, base_parser, output_dir

CONFIGS = ROOT / "configs"
BIN = Path(sys.executable).parent
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4  # relative, every step (float32 on CPU)
COMPILE_TOL = (1e-4, 1e-3)
SCALE_FLOOR = 1e-2  # below this, differences are absolute (see max_relative)
STAGES = ("pretrain", "sft", "reward", "dpo", "grpo", "orpo", "kto")


@dataclass
class Run:
    name: str
    args: list[str] = field(default_factory=list)
    devices: int = 1
    kill_at: int | None = None  # SIGKILL after this step's checkpoint, then resume
    preempt_at: int | None = None  # SIGTERM inside this step's accumulation (checkpoint at its end), then resume


@dataclass
class Case:
    stage: str
    klass: str
    runs: list[Run]  # the first is the reference
    control: bool = False  # expected to FAIL
    tolerance: tuple[float, float] = (LOSS_TOL, GRAD_TOL)
    note: str = ""
    config: str | None = None  # configs/<config>.yaml, when not the stage's own
    context: bool = False  # measured and shown, never pass/fail (bf16: the float32 tolerance does not apply)
    column: str = ""  # the summary table's column, when not the class


def split(batch: int, accumulate: int, *extra: str, name: str | None = None) -> Run:
    return Run(name or f"{batch}x{accumulate}", ["--data.init_args.batch_size", str(batch),
                                                 "--trainer.accumulate_grad_batches", str(accumulate), *extra])


def batch_splits(*extra: str, suffix: str = "") -> list[Run]:
    """Global batch 8 as 8x1 (the reference), 4x2 and 1x8, each with the same extra arguments."""
    return [split(batch, accumulate, *extra, name=f"{batch}x{accumulate}{suffix}")
            for batch, accumulate in ((8, 1), (4, 2), (1, 8))]


def cases(stages: list[str], classes: list[str]) -> list[Case]:
    out: list[Case] = []
    for stage in stages:
        if "batch_split" in classes:
            out.append(Case(stage, "batch_split", batch_splits()))
        if "world_size" in classes:
            ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
            fsdp = ["--config", str(CONFIGS / "fragments" / "fsdp.yaml"), "--trainer.devices", "2"]
            out.append(Case(stage, "world_size", [
                split(2, 4, name="1proc x acc4"),
                Run("ddp 2 x acc2", split(2, 2).args + ddp, devices=2),
                Run("fsdp2 2 x acc2", split(2, 2).args + fsdp, devices=2),
            ]))
        if "model_switches" in classes:
            out.append(Case(stage, "model_switches", [split(4, 2, name="plain"), split(
                4, 2, "--model.init_args.activation_checkpointing", "true", name="activation checkpointing")]))
        if "compile" in classes and stage != "grpo":  # GRPO: not measured (generation changes shapes every token)
            out.append(Case(stage, "compile", [split(4, 2, name="eager"), split(
                4, 2, "--model.init_args.compile", "true", name="torch.compile")], tolerance=COMPILE_TOL,
                note=f"fused kernels reorder float32 sums: tolerance {COMPILE_TOL[0]:g} / {COMPILE_TOL[1]:g}"))
        if "resume" in classes:
            out.append(Case(stage, "resume", [split(4, 2, name="uninterrupted"), Run("killed+resumed", split(4, 2).args, kill_at=2),
                                              Run("preempted+resumed", split(4, 2).args, preempt_at=1)]))
        if "precision" in classes:
            out.append(Case(stage, "precision", [split(4, 2, name="32-true"),
                                                 Run("bf16-mixed", split(4, 2).args + ["--trainer.precision", "bf16-mixed"])],
                            note="context only: bf16 rounds every matmul", context=True))
        if "precision" in classes and "batch_split" in classes:  # how far bf16 alone moves a split apart
            out.append(Case(stage, "batch_split", batch_splits("--trainer.precision", "bf16-mixed", suffix=" bf16"),
                            note="precision: bf16-mixed, context only: a split changes the shapes bf16 rounds",
                            context=True, column="batch_split bf16-mixed"))
    if "batch_split" in classes and "sft" in stages:  # sequence: exact by construction (the step's sequence count)
        sequence = ["--model.init_args.normalize", "sequence"]
        out.append(Case("sft", "batch_split", batch_splits(*sequence, suffix=" sequence"), note="normalize: sequence"))
    if "batch_split" in classes and "grpo" in stages:  # grpo: exact when every micro-batch holds as many completions
        agg = ["--model.init_args.loss_aggregation"]
        for name in ("dr_grpo", "grpo", "cispo", "sapo", "luspo", "vespo"):
            out.append(Case("grpo", "batch_split", batch_splits(*agg, name, suffix=f" {name}"),
                            note=f"loss_aggregation: {name}"))
    if "packing" in classes and "sft" in stages:
        # one step = the whole (small) training set, so packed and unpacked steps hold the same examples
        out.append(Case("sft", "packing", [
            Run("none", ["--data.init_args.packing", "none", "--data.init_args.batch_size", "64", "@small"]),
            Run("documents", ["--data.init_args.packing", "documents", "--data.init_args.batch_size", "64", "@small"]),
        ]))
    if "dpo_reference" in classes and "dpo" in stages:
        out.append(Case("dpo", "dpo_reference", [split(4, 2, "--model.init_args.reference", "precompute", name="precompute"),
                                                 split(4, 2, "--model.init_args.reference", "live", name="live")]))
        # LoRA's reference is the policy with its adapters disabled; precompute scores the pairs with the initial
        # policy (zero adapters), which is what a frozen copy would hold: equal only if disabling is exact
        lora = ["--model.init_args.lora", '{"rank": 4, "alpha": 8, "dropout": 0.0}']
        out.append(Case("dpo", "lora_reference", [
            split(4, 2, *lora, "--model.init_args.reference", "precompute", name="initial policy (precompute)"),
            split(4, 2, *lora, "--model.init_args.reference", "live", name="adapters disabled (live)")]))
    if "batch_split" in classes:  # negative controls
        if "sft" in stages:
            micro = ["--model.init_args.normalize", "micro_batch"]
            out.append(Case("sft", "batch_split", batch_splits(*micro), control=True, note="normalize: micro_batch"))
        if "grpo" in stages:
            bnpo = ["--model.init_args.loss_aggregation", "bnpo"]
            out.append(Case("grpo", "batch_split", batch_splits(*bnpo), control=True,
                            note="loss_aggregation: bnpo (divides by each micro-batch's own tokens)"))
        if "kto" in stages:
            micro = ["--model.init_args.kl_reference", "micro_batch"]
            out.append(Case("kto", "batch_split", batch_splits(*micro), control=True,
                            note="kl_reference: micro_batch (TRL's z0 per micro-batch)"))
        if "dpo" in stages:
            legacy = ["--model.init_args.logp_reduction", "legacy_mean_padded"]
            out.append(Case("dpo", "batch_split", [split(8, 1, *legacy), split(1, 8, *legacy)], control=True,
                            note="logp_reduction: legacy_mean_padded (divides by the micro-batch's padded length)"))
    if "stream_resume" in classes and "pretrain" in stages:
        # the stream's order depends on the world size by design: each world size is compared with itself
        ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
        note = "StreamingPretrainData: 2 sources mixed 3:1 from token shards, shuffled"
        out.append(Case("pretrain", "stream_resume", [
            split(4, 2, name="stream uninterrupted"), Run("stream killed+resumed", split(4, 2).args, kill_at=2),
            Run("stream preempted+resumed", split(4, 2).args, preempt_at=1)], config=STREAM, note=note))
        out.append(Case("pretrain", "stream_resume", [
            Run("stream ddp 2 uninterrupted", split(2, 2).args + ddp, devices=2),
            Run("stream ddp 2 killed+resumed", split(2, 2).args + ddp, devices=2, kill_at=2)],
            config=STREAM, note=note + ", 2 DDP ranks"))
    if "packing" in classes and "pretrain" in stages:
        out.append(Case("pretrain", "packing", [Run("documents", ["--data.init_args.packing", "documents"]),
                                                Run("concat", ["--data.init_args.packing", "concat"])],
                        control=True, note="packing: concat (attention crosses documents)"))
    return out


# --------------------------------------------------------------------------- launching runs


def env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSTAGES_", "WANDB_"))}
    path = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH")) if p)
    return {**base, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": path}  # PYTHONPATH: the runs import benchmarks.fault_injection


def fragment(work: Path, stage: str, steps: int, every: int, kill_at: int | None = None,
             preempt_at: int | None = None) -> Path:
    """Tiny model, short rows, no validation, CSV logging every step, checkpoints every `every` steps
    (and, with `kill_at`, a SIGKILL of the run right after step `kill_at`'s checkpoint)."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": every}}]
    if kill_at is not None:
        callbacks.append({"class_path": "benchmarks.fault_injection.KillAtStep", "init_args": {"step": kill_at}})
    if preempt_at is not None:  # SIGTERM at the second micro-batch of step preempt_at
        callbacks.append({"class_path": "benchmarks.fault_injection.SignalAtStep", "init_args": {"step": preempt_at, "micro": 1}})
    model = {"preset": "tiny", "warmup_steps": 2}
    data = {"cache_dir": str(work / "cache"), "seq_len": 64 if stage != "sft" else 96}
    if stage == "sft":
        model["generate_samples"] = 0
    if stage == "grpo":  # from a short SFT run, so completions stop at different lengths; shorter is rewarded
        model.update(group_size=4, max_completion_length=8, reward="length", init_from=str(work / GRPO_INIT))
        data = {"cache_dir": str(work / "cache"), "max_prompt_len": 48, "num_prompts": 400}
    override = {
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "log_every_n_steps": 1,
            "val_check_interval": 100_000, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": callbacks,
            "logger": {"class_path": "llmstages.loggers.CSVLogger", "init_args": {"flush_logs_every_n_steps": 1}},
        },
        "model": {"init_args": model},
        "data": {"init_args": data},
    }
    if stage == "sft":
        override["data"]["init_args"]["packing"] = "none"  # examples of very different lengths per micro-batch
    if stage == STREAM:  # small sources: the runs cross epochs and the code source repeats
        override["data"]["init_args"].update(
            sources={name: str(work / "shards" / name) for name in STREAM_SOURCES}, weights={"web": 0.75, "code": 0.25},
            shuffle_buffer=4, val_fraction=0.0)
    path = work / f"{stage}{'-kill' if kill_at is not None else ''}{'-preempt' if preempt_at is not None else ''}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


GRPO_INIT = "grpo-init.ckpt"
STREAM = "pretrain_stream"  # configs/pretrain_stream.yaml
STREAM_SOURCES = {"web": slice(0, 120), "code": slice(120, 160)}  # documents of the embedded corpus


def stream_shards(work: Path) -> None:
    """Token shards of two sources for the streamed-pretraining runs, prepared once with the runs' tokenizer."""
    from llmstages.data import synthetic
    from llmstages.data.base import default_tokenizer
    from llmstages.data.shards import prepare_shards

    docs = synthetic.pretrain_corpus(seed=11)
    for name, part in STREAM_SOURCES.items():
        if not (work / "shards" / name / "index.json").exists():
            text = work / f"{name}.txt"
            text.write_text("\n".join(docs[part]) + "\n")
            prepare_shards([text], default_tokenizer(work / "cache"), work / "shards" / name, shard_tokens=1000,
                           workers=1, progress=False)


def grpo_init(work: Path, timeout: float) -> None:
    """The SFT checkpoint every GRPO run starts from (a random model never stops: every completion would be as long)."""
    if (work / GRPO_INIT).exists():
        return
    case, run = Case("sft", "init", []), Run("grpo-init")
    launch(work, case, run, 60, timeout)
    os.replace(work / "runs" / "sft" / run_dir_name(case, run) / "checkpoints" / "last.ckpt", work / GRPO_INIT)


def small_sft_file(work: Path) -> Path:
    from llmstages.data import synthetic

    path = work / "small-sft.jsonl"
    if not path.exists():
        with path.open("w") as f:
            for record in synthetic.sft_conversations(24, seed=7, multi_turn_fraction=0.5):
                f.write(json.dumps({"messages": record["messages"]}) + "\n")
    return path


def command(work: Path, case: Case, run: Run, steps: int, kill: bool = False) -> list[str]:
    args = []
    for arg in run.args:
        args += (["--data.init_args.files", f"[{small_sft_file(work)}]", "--data.init_args.val_fraction", "0"]
                 if arg == "@small" else [arg])
    every = run.kill_at or steps
    config = case.config or case.stage
    return [str(BIN / "llmstages"), "fit", "--config", str(CONFIGS / f"{config}.yaml"),
            "--config", str(fragment(work, config, steps, every, run.kill_at if kill else None,
                                     run.preempt_at if kill else None)),
            "--trainer.default_root_dir", str(work / "runs"), "--run_name", run_dir_name(case, run), *args]


def run_dir_name(case: Case, run: Run) -> str:
    return "-".join(["ctl" if case.control else "eq", case.klass, run.name]).replace(" ", "_")


def launch(work: Path, case: Case, run: Run, steps: int, timeout: float) -> Path:
    folder = work / "runs" / case.stage / run_dir_name(case, run)
    cmd = command(work, case, run, steps)
    if run.kill_at is not None:  # the first attempt kills itself right after step kill_at's checkpoint
        killed = execute(command(work, case, run, steps, kill=True), work, case, run, timeout)
        saved = folder / "checkpoints" / "last.ckpt"
        if killed.returncode != -signal.SIGKILL or not saved.exists():
            raise RuntimeError(f"{case.stage}/{run.name}: expected a SIGKILL after the checkpoint of step {run.kill_at}, "
                               f"got exit {killed.returncode}, {saved} {'exists' if saved.exists() else 'missing'}:\n"
                               f"{killed.stderr[-2000:]}")
        cmd = [*cmd, "--ckpt_path", "last"]
    if run.preempt_at is not None:  # the first attempt SIGTERMs itself inside step preempt_at: a checkpoint at its end
        from llmstages.preemption import PREEMPTED_EXIT_CODE

        stopped = execute(command(work, case, run, steps, kill=True), work, case, run, timeout)
        if stopped.returncode != PREEMPTED_EXIT_CODE:
            raise RuntimeError(f"{case.stage}/{run.name}: expected exit {PREEMPTED_EXIT_CODE} (preempted), "
                               f"got {stopped.returncode}:\n{stopped.stderr[-2000:]}")
        cmd = [*cmd, "--ckpt_path", "last"]
    result = execute(cmd, work, case, run, timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{case.stage}/{run.name} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return folder


def execute(cmd: list[str], work: Path, case: Case, run: Run, timeout: float) -> subprocess.CompletedProcess:
    """One attempt in its own session (so a kill takes all its ranks and nothing else), bounded by `timeout`."""
    try:
        return subprocess.run(cmd, cwd=work, env=env(), capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{case.stage}/{run.name}: timed out after {timeout} s (a hang?): {' '.join(cmd)}") from None


def trajectory(folder: Path, key: str) -> dict[int, float]:
    """step -> the last logged value of `key` (a resumed run's second attempt overwrites the first)."""
    out: dict[int, float] = {}
    for path in sorted(folder.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    out[int(row["step"])] = float(row[key])
    return out


# --------------------------------------------------------------------------- comparison


def max_relative(a: dict[int, float], reference: dict[int, float], steps: list[int]) -> tuple[float, list[float]]:
    """Largest |a - ref| / max(|ref|, SCALE_FLOOR) over `steps` (inf when a step is missing), and the per-step values.

    The floor: a value that is zero by construction (GRPO's `grpo` loss on-policy: the mean advantage of
    each group) is compared absolutely, not by its float noise."""
    per_step = [abs(a[s] - reference[s]) / max(abs(reference[s]), SCALE_FLOOR) if s in a and s in reference
                else float("inf") for s in steps]
    return (max(per_step) if per_step else float("inf")), per_step


def evaluate(case: Case, folders: list[Path], steps: int) -> dict:
    ref_loss, ref_grad = trajectory(folders[0], "train/step_loss"), trajectory(folders[0], "train/grad_norm")
    compared = sorted(ref_loss)[:steps]
    result = {"stage": case.stage, "class": case.klass, "control": case.control, "note": case.note, "runs": {},
              "context": case.context, "column": case.column or case.klass,
              "reference": case.runs[0].name, "reference_loss": [ref_loss[s] for s in compared]}
    for run, folder in zip(case.runs[1:], folders[1:]):
        window = [s for s in compared if run.kill_at is None or s >= run.kill_at]  # resumed steps only
        dl, dl_steps = max_relative(trajectory(folder, "train/step_loss"), ref_loss, window)
        dg, _ = max_relative(trajectory(folder, "train/grad_norm"), ref_grad, window)
        result["runs"][run.name] = {"loss": dl, "grad_norm": dg, "per_step": dl_steps, "steps": window}
    worst_l = max((r["loss"] for r in result["runs"].values()), default=0.0)
    worst_g = max((r["grad_norm"] for r in result["runs"].values()), default=0.0)
    result.update(loss=worst_l, grad_norm=worst_g, within=worst_l <= case.tolerance[0] and worst_g <= case.tolerance[1],
                  tolerance=case.tolerance)
    return result


def worst(results: list[dict]) -> dict:
    """The case of a (stage, class) cell that is furthest from its tolerance."""
    return max(results, key=lambda r: max(r["loss"] / r["tolerance"][0], r["grad_norm"] / r["tolerance"][1]))


def fails_widely(result: dict) -> bool:
    """A control must miss its class's tolerance by at least 10x on the loss or the gradient norm."""
    loss_tol, grad_tol = result["tolerance"]
    return result["loss"] > 10 * loss_tol or result["grad_norm"] > 10 * grad_tol


def cell(result: dict) -> str:
    if result["context"]:
        return f"{result['loss']:.1e} / {result['grad_norm']:.1e} (context)"
    mark = ("✅" if result["within"] else "❌")
    return f"{result['loss']:.1e} / {result['grad_norm']:.1e} {mark}"


def write_report(results: list[dict], args, out: Path, report: Report) -> None:
    equal = [r for r in results if not r["control"]]
    controls = [r for r in results if r["control"]]
    stages = list(dict.fromkeys(r["stage"] for r in equal))
    columns = list(dict.fromkeys(r["column"] for r in equal))
    report.text(f"Max relative |Δ train/step_loss| / |Δ train/grad_norm| over {args.steps} optimiser steps against each "
                f"class's reference run; ✅ within {LOSS_TOL:g} / {GRAD_TOL:g} at every step. A blank cell: the class "
                "does not apply to that stage.")
    rows = []
    for stage in stages:
        row = [stage]
        for column in columns:
            match = [r for r in equal if r["stage"] == stage and r["column"] == column]
            row.append(cell(worst(match)) if match else "")
        rows.append(row)
    report.table(["stage", *columns], rows)
    report.text("A cell is the worst of its cases; \"(context)\" marks a measured deviation that is not held to the "
                "float32 tolerance (bf16-mixed): `precision` compares bf16-mixed with float32, `batch_split bf16-mixed` the "
                "three splits with each other, all in bf16-mixed. Every case, runs compared (reference first):")
    report.table(["stage", "class", "option", "runs", "max rel Δ loss / grad norm"],
                 [[r["stage"], r["class"], r["note"] or "defaults", f"{r['reference']} vs {', '.join(r['runs'])}", cell(r)]
                  for r in equal])
    if controls:
        report.text("## Negative controls\n\nEach must fail its class by a wide margin (❌ is the expected result).")
        report.table(["stage", "class", "variant", "max rel Δ loss / grad norm", "fails as it must"],
                     [[r["stage"], r["class"], r["note"], f"{r['loss']:.1e} / {r['grad_norm']:.1e}",
                       "yes" if fails_widely(r) else "**NO: the suite is broken**"]
                      for r in controls])
    report.text("## Invariant by construction, though it may look otherwise\n\n"
                "`normalize: sequence` divides by the step's sequence count across micro-batches and ranks, so it is "
                "as split-invariant as `token` (it weights tokens by 1/length: a length bias, not a split dependence); "
                "measured above. GRPO's `grpo` aggregation (mean per completion, then per micro-batch, / accumulation) "
                "is invariant whenever every micro-batch holds as many completions, as in every split here; with "
                "unequal micro-batches (3 + 5 completions) it is not, shown in tests/test_grpo_losses.py; the same holds "
                "for `sapo` and `luspo` (a mean over each micro-batch's completions; tests/test_grpo_loss_types.py), "
                "while `cispo` and `vespo` share dapo's step-wide divisor. On-policy its "
                f"step loss is zero by construction (each group's mean advantage), so losses below {SCALE_FLOOR:g} are "
                "compared absolutely. A resumed run continues from the checkpoint of step k: its first compared step is k.")
    for png in plot(results, out):
        report.text(f"![{png.stem}]({png.name})")
    report.write(out)
    (out / "invariance.json").write_text(json.dumps(results, indent=1, default=str))


def plot(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for stage in dict.fromkeys(r["stage"] for r in results):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True)
        reference = next(r for r in results if r["stage"] == stage and not r["control"])
        top.plot(reference["reference_loss"], color="black")
        top.set_ylabel("train/step_loss (reference)")
        for r in (r for r in results if r["stage"] == stage):
            for name, run in r["runs"].items():
                values = [max(v, 1e-12) for v in run["per_step"]]
                style = "--" if r["control"] else "-"
                bottom.semilogy(run["steps"], values, style, label=f"{r['class']}: {name}" + (" (control)" if r["control"] else ""))
        bottom.axhline(LOSS_TOL, color="grey", linewidth=0.8)
        bottom.set_ylabel("relative |Δ loss|")
        bottom.set_xlabel("optimiser step")
        bottom.legend(fontsize=6)
        fig.tight_layout()
        paths.append(out / f"invariance_{stage}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


CLASSES = ("batch_split", "world_size", "packing", "dpo_reference", "model_switches", "compile", "resume", "stream_resume",
           "precision")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], default_repeats=1)
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per run")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--classes", nargs="+", default=list(CLASSES), choices=CLASSES)
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take before it counts as a hang")
    args = parser.parse_args(argv)
    if args.quick:
        args.stages, args.classes, args.steps = ["sft", "dpo"], ["batch_split", "resume"], 5
    out = output_dir(args)
    report = Report("invariance", "Trajectory invariance: whole runs that must train identically", args)
    results = []
    with tempfile.TemporaryDirectory(prefix="llmstages-invariance-") as tmp:
        work = Path(tmp)
        for case in cases(args.stages, args.classes):
            if case.stage == "grpo":
                grpo_init(work, args.timeout)
            if case.config == STREAM:
                stream_shards(work)
            # single-process runs two at a time (one torch thread each); multi-process runs alone
            workers = 1 if any(run.devices > 1 for run in case.runs) else 2
            with ThreadPoolExecutor(workers) as pool:
                folders = list(pool.map(lambda run: launch(work, case, run, args.steps, args.timeout), case.runs))
            results.append(evaluate(case, folders, args.steps))
            r = results[-1]
            print(f"{r['stage']:9s} {r['class']:14s} {'control ' if r['control'] else ''}"
                  f"loss {r['loss']:.2e} grad {r['grad_norm']:.2e} {'within' if r['within'] else 'OUTSIDE'}", flush=True)
    write_report(results, args, out, report)
    broken = [r for r in results if (r["control"] and not fails_widely(r))
              or (not r["control"] and not r["context"] and not r["within"])]
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
