"""What every family shares: metrics, a training run, held-out quality, and the base checkpoints.

Design choices:
- The base checkpoints (pretrain, then SFT from it) are trained the way a
  user chains stages, through `configs/<stage>.yaml` and `init_from` (as
  `llmstages demo` does); the family runs themselves are built in-process,
  because their metrics need the trained module.
- A cached base checkpoint is keyed by name, preset, scale, data files and a
  hash of the code (`llmstages/`, `configs/`, this package), so a checkpoint
  trained by other code is never reused.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch

from benchmarks.common import ROOT
from llmstages.callbacks import batch_tokens
from llmstages.data import KTOData, PreferenceData, PretrainData, SFTData, synthetic
from llmstages.evaluation import evaluate_replies

CONFIGS = ROOT / "configs"
EVAL_SEED = 4242  # held-out prompts: synthetic's `eval` stream, which no training set draws from


def code_hash(folders: Iterable[Path]) -> str:
    """12 hex digits over the relative paths and contents of every .py and .yaml file under `folders`."""
    digest = hashlib.sha1()
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(folder.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def relative_error(a: torch.Tensor, reference: torch.Tensor) -> float:
    """||a - reference|| / ||reference||."""
    return float((a.double() - reference.double()).norm() / reference.double().norm())


def length_drift(lengths: list[int], baseline: list[int]) -> float:
    """Mean reply length relative to the baseline model's on the same prompts (1.0: unchanged)."""
    if not lengths or len(lengths) != len(baseline):
        raise ValueError("length_drift needs equally many replies from both models")
    return statistics.mean(lengths) / max(statistics.mean(baseline), 1e-9)


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


class StepLosses(L.Callback):
    """`train/loss` after every optimiser step (the curve), and labelled tokens over time in the batches."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.labelled, self.seconds = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._start
        if "prompt_ids" not in batch:  # GRPO's prompt batches carry no labels (RolloutCurves measures them)
            self.labelled += batch_tokens(batch)[1]
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and "train/loss" in trainer.callback_metrics:
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


def fit(module, data, steps: int, accumulate: int = 1, logger=None, callbacks=(), **trainer_args) -> tuple[list[float], float]:
    """Train; returns the loss curve and labelled (trained) tokens per second of training step."""
    curve = StepLosses()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, logger=logger or False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[curve, *callbacks], **trainer_args,
    )
    trainer.fit(module, data)
    if logger is not None:
        import wandb

        wandb.finish()  # one W&B run per training run
    return curve.losses, curve.labelled / max(curve.seconds, 1e-9)


@torch.no_grad()
def held_out_loss(module, data) -> dict[str, float]:
    """Token-weighted validation loss and token accuracy (teacher-forced) on `data`'s validation split."""
    module.eval()
    total = {"loss": 0.0, "token_acc": 0.0}
    weight = 0
    for batch in data.val_dataloader():
        _, stats, n = module.compute_loss(batch)
        for key in total:
            total[key] += float(stats[key]) * int(n)
        weight += int(n)
    module.train()
    return {key: value / max(weight, 1) for key, value in total.items()}


def reply_quality(backbone, data, n: int) -> dict[str, float]:
    items = synthetic.prompt_answer_pairs(n, seed=EVAL_SEED)
    prompts = [data.template.encode_prompt(m, data.tokenizer) for m, _, _ in items]
    answers = [a for _, a, _ in items]
    ref_ids = [data.template.encode_reply(a, data.tokenizer)["input_ids"] for a in answers]
    quality = evaluate_replies(backbone, prompts, answers, data.template.stop_token_id(data.tokenizer),
                               data.tokenizer, 24, reference_ids=ref_ids)
    return {k: quality[k] for k in ("first_token_acc", "stop_rate", "exact_match")}


class Bench:
    """Shared checkpoints and settings of one benchmark run."""

    def __init__(self, args, out: Path) -> None:
        self.args, self.out = args, out
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.code = code_hash([ROOT / "llmstages", CONFIGS, Path(__file__).parent])

    def data(self, kind: str, seed: int = 0, **kwargs):
        cls = {"pretrain": PretrainData, "sft": SFTData, "preference": PreferenceData, "kto": KTOData}[kind]
        kwargs.setdefault("batch_size", 8 if kind != "pretrain" else 16)
        kwargs.setdefault("seq_len", 256 if kind == "sft" else 128)
        files = {"sft": self.args.sft_data, "preference": self.args.pref_data, "kto": self.args.pref_data}.get(kind)
        if files:
            kwargs.setdefault("files", [str(f) for f in files])
        return cls(cache_dir=str(self.cache), seed=seed, **kwargs)

    def logger(self, family: str, variant: str, seed: int):
        if not self.args.wandb:
            return None
        from llmstages.loggers import WandbAutoLogger

        return WandbAutoLogger(project="llmstages-variants", name=f"{family}-{variant}-s{seed}", group=family,
                               job_type=variant, save_dir=str(self.cache), offline=True)  # W&B adds wandb/

    def checkpoint_path(self, name: str) -> Path:
        """`<cache>/<name>-<preset>-<scale>[-<data>]-<code>.ckpt`: a base checkpoint is reused only by a run
        with the same data files and the same code (package sources and configs, `code_hash`)."""
        given = [*(self.args.sft_data or []), *(self.args.pref_data or [])]
        tag = "-" + hashlib.sha1("\n".join(map(str, given)).encode()).hexdigest()[:8] if given else ""
        return self.cache / f"{name}-{self.args.preset}-{self.args.scale}{tag}-{self.code}.ckpt"

    def stage_checkpoint(self, name: str, stage: str, steps: int, init_from: Path | None = None) -> Path:
        """A base checkpoint trained by `llmstages fit --config configs/<stage>.yaml` (as the demo chains
        stages), with a fragment that sets the preset, steps, cache and data files and turns off logging,
        validation and the throughput callbacks; cached under `checkpoint_path(name)`."""
        path = self.checkpoint_path(name)
        if path.exists():
            return path
        import yaml

        from llmstages.trainer_cli import lightning_cli

        root = self.cache / "runs" / path.stem
        root.mkdir(parents=True, exist_ok=True)
        model = {"preset": self.args.preset, **({"init_from": str(init_from)} if init_from else {})}
        if stage == "sft":
            model["generate_samples"] = 0
        data = {"cache_dir": str(self.cache)}
        files = self.args.sft_data if stage == "sft" else None
        if files:
            data["files"] = [str(f) for f in files]
        fragment = root / "bench.yaml"
        fragment.write_text(yaml.safe_dump({
            "trainer": {"max_steps": steps, "default_root_dir": str(root), "logger": False, "limit_val_batches": 0,
                        "enable_progress_bar": False, "enable_model_summary": False,
                        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"save_last": True, "every_n_train_steps": steps}}]},
            "model": {"init_args": model}, "data": {"init_args": data},
        }, sort_keys=False))
        cli = lightning_cli(["fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--config", str(fragment)])
        shutil.copyfile(cli.trainer.checkpoint_callback.last_model_path, path)
        return path

    def pretrained(self) -> Path:
        return self.stage_checkpoint("pretrain", "pretrain", self.steps(400))

    def sft(self) -> Path:
        return self.stage_checkpoint("sft", "sft", self.steps(300), init_from=self.pretrained())

    def short_sft(self, steps: int) -> Path:
        return self.stage_checkpoint(f"sft{steps}", "sft", self.steps(steps), init_from=self.pretrained())

    def steps(self, n: int) -> int:
        return max(4, int(n * self.args.scale))



def brief(row: dict) -> str:
    """One progress line's values: the float metrics of a run."""
    return ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float))
