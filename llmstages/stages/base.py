"""StageModule: what the training stages share.

Design choices:
- The backbone is built from a `ModelConfig` (data, never an `nn.Module`
  hyper-parameter: Lightning #19906), so every checkpoint rebuilds itself
  from its saved hyper-parameters.
- `init_from` (a `.ckpt` of any llmstages stage, or a Hugging Face folder; read by
  `model.checkpoint.load_backbone_weights`, the one loader of trained weights) is
  loaded in `setup`, before sharding and before a `--ckpt_path` resume, so a
  resumed run continues from its own checkpoint, not from `init_from`.
- `configure_model` applies FSDP2 `fully_shard` per block and on the root
  when the strategy hands us a device mesh (`ModelParallelStrategy`); DDP and
  single-device runs leave the model alone.
- AdamW without weight decay on norms, biases and embeddings; linear warm-up
  then cosine decay to `min_lr_ratio * lr` over the trainer's stepping batches.
- Every optimiser step logs `train/step_loss` (the `loss` stat averaged over
  the step's micro-batches and ranks, weighted like validation) and
  `train/grad_norm` (before clipping): the two trajectories that must not
  depend on how a step is split. The norm is one pass over the gradients per
  step (`gradient_norm`): the same tensor is logged, read by the non-finite
  guard and handed to the clipping (`configure_gradient_clipping`), where
  Lightning's own clipping would measure it again (the same
  `clip_grad_norm_` maths, so what trains is unchanged).
- One loss method per stage: `compute_loss(batch) -> (loss, stats, weight)`.
  `loss` is what backward sees (already normalised for the whole optimiser
  step); `stats` are detached means over this micro-batch's `weight` units
  (tokens, pairs), logged as `train/<name>` every step and as weighted means
  `val/<name>` per validation epoch (names declared in `METRICS`, so every
  rank syncs the same metrics). A stat with its own weight is a `Weighted`.
  `training_step`, `validation_step` and the epoch-end logging live here only; no stage
  overrides them. The seams a stage may fill instead: `on_step_start(batch)` (once per
  optimiser step, at its first micro-batch, before its first `compute_loss`; `starts_step`
  says which micro-batch that is), `STEP_LOSS` (how `train/step_loss` sums the step's
  micro-batches: weighted mean or sum) and `validation_stats(batch, batch_idx)` (what a
  validation batch contributes; by default `compute_loss`'s stats).
- Loss normalisation: `step_counts` sums the data's per-step counts across
  ranks and `grad_scale` undoes Lightning's and DDP's averaging; together
  they are the arguments `llmstages.losses.reduce_token_loss` and
  `reduce_pair_loss` expect.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor

from llmstages.errors import ConfigError
from llmstages.losses import DEFAULT_CHUNK_SIZE, NORMALIZE_MODES, token_logps
from llmstages.metrics import WeightedMeans
from llmstages.model.checkpoint import check_init_from, load_backbone_weights, resolve_config
from llmstages.model.config import ModelConfig, PresetName
from llmstages.model.lora import LoRAConfig, apply_lora
from llmstages.model.transformer import Transformer
from llmstages.options import Normalize, check_choice


StepLoss = Literal["mean", "sum"]


class Weighted(NamedTuple):
    """A stat that is a mean over its own count (e.g. reply starts), not over the batch's `weight`."""

    value: Tensor
    weight: Tensor | float


def data_parallel_mesh(mesh):
    """The data-parallel dimension of a Lightning ModelParallelStrategy mesh (every rank, with FSDP2Strategy)."""
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def _check_model_folder_vocab(init_from: str | None, vocab_size: int | None) -> None:
    """A Hugging Face folder's tokenizer and this run's must be the same size (before any data is built).

    The run's may be larger by the special tokens llmstages appends (a distinct pad);
    a different tokenizer would train silently with mismatched ids.
    """
    if init_from is None or vocab_size is None or not Path(init_from).is_dir():
        return
    folder = Path(init_from)
    if (folder / "tokenizer.json").is_file():
        from llmstages.data.tokenizer import Tokenizer

        own = Tokenizer.from_file(folder).vocab_size  # with the same appended pad as the run's would get
        if own != vocab_size:
            raise ConfigError(
                f"init_from {folder}: the run's tokenizer has {vocab_size} tokens, the model folder's own "
                f"{own}; leave data.init_args.tokenizer unset to use the folder's, or pass a tokenizer of this model"
            )


def _checked_init_from(init_from: str | None, vocab_size: int | None) -> dict | None:
    """`check_init_from`'s recorded config of a `.ckpt`, after checking its vocabulary is this run's."""
    saved = check_init_from(init_from)
    if saved is not None and vocab_size is not None and saved.get("vocab_size") not in (None, vocab_size):
        raise ConfigError(
            f"init_from {init_from}: its vocabulary (embedding shape) has {saved['vocab_size']} tokens, this run's tokenizer "
            f"{vocab_size}; use the tokenizer that checkpoint was trained with (data.init_args.tokenizer)"
        )
    return saved


def concat_pairs(batch: dict) -> dict[str, Tensor]:
    """Chosen rows then rejected rows as one batch, for a single forward pass over both sides."""
    return {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "labels", "position_ids")}


class StageModule(L.LightningModule):
    METRICS: ClassVar[tuple[str, ...]] = ("loss",)  # stats of compute_loss averaged over validation
    PROGRESS_BAR: ClassVar[tuple[str, ...]] = ("loss",)  # shown in the progress bar while training
    # train/step_loss: "mean" weights each micro-batch's `loss` stat by its `weight` (a mean over the step's
    # units); "sum" adds the micro-batch losses (each already normalised for the whole step, as GRPO's are)
    STEP_LOSS: ClassVar[StepLoss] = "mean"

    def __init__(
        self,
        model: ModelConfig | dict | None = None,
        preset: PresetName = "tiny",
        vocab_size: int | None = None,
        init_from: str | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        lora: LoRAConfig | dict | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        """
        Args:
            model: the backbone's shape (or its dict, as a checkpoint saves it); None takes it from a Hugging Face
                `init_from` folder's config.json, else from `preset`.
            preset: a named `ModelConfig` preset (`model.config.PresetName`).
            vocab_size: overrides the config's; the CLI links it to the data's tokenizer.
            init_from: an llmstages `.ckpt` or a Hugging Face model folder to start from.
            lr: peak learning rate (AdamW), reached after `warmup_steps`.
            weight_decay: AdamW decay on matrices (never on norms, biases, embeddings).
            betas: AdamW's betas.
            warmup_steps: linear warm-up steps, then cosine decay.
            min_lr_ratio: the cosine's floor as a fraction of `lr`.
            lora: LoRA adapters {rank, alpha, dropout, targets: [q, k, v, o, gate, up, down]}: the base weights
                freeze and only the adapters train (merged on export); null: full fine-tuning.
            activation_checkpointing: recompute each block's activations in backward (memory for time).
            compile: `torch.compile` each block (in place: parameter names and checkpoints unchanged).
        """
        super().__init__()
        self.save_hyperparameters()
        if isinstance(model, dict):
            model = ModelConfig.from_dict(model)
        # fail early, before any data is built: init_from readable, its vocabulary the tokenizer's;
        # a .ckpt's recorded shape wins over `preset`, so chaining never rebuilds another shape
        saved = _checked_init_from(init_from, vocab_size)
        if model is None and saved is not None and len(saved) > 1:
            model = ModelConfig.from_dict(saved)
        self.config = config = resolve_config(model, preset, vocab_size, init_from)
        # the full resolved shape, as plain data (load_from_checkpoint's weights_only load accepts it)
        self.hparams["model"] = config.to_dict()
        _check_model_folder_vocab(init_from, vocab_size)
        self.backbone = Transformer(config)
        self.backbone.activation_checkpointing = activation_checkpointing
        if isinstance(lora, dict):
            lora = LoRAConfig.from_dict(lora)
        self.lora = lora
        if lora is not None:
            apply_lora(self.backbone, lora)  # before init_from loads base weights and before sharding
            self.hparams["lora"] = lora.to_dict()  # plain data; export and init_from merge with it
        self._initialised = init_from is None
        self.val_means = WeightedMeans(*(f"val/{name}" for name in self.METRICS))
        self._step_loss: Tensor | None = None  # (sum of loss * weight, sum of weight) over the step's micro-batches
        self._grad_norm: Tensor | None = None  # this optimiser step's gradient norm, once measured
        self._grad_norm_params: list[Tensor] | None = None  # the optimiser's parameters it sums over, in order

    # ----------------------------------------------------------------- set-up

    def setup(self, stage: str) -> None:
        self.load_initial_weights()

    def load_initial_weights(self) -> None:
        """Load `init_from` into the backbone once (never over a checkpoint's weights)."""
        if not self._initialised:
            load_backbone_weights(self.backbone, self.hparams.init_from)
            self._initialised = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # the checkpoint's weights supersede init_from (load_from_checkpoint, then validate/fit)
        self._initialised = True

    def configure_model(self) -> None:
        self._shard()
        self._compile()

    def _shard(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        dp_mesh = data_parallel_mesh(mesh)
        world = self.trainer.world_size
        if dp_mesh.size() != world:
            # a smaller data-parallel mesh would leave gradients unreduced while ranks see different data
            raise ConfigError(
                f"FSDP2 needs every rank data-parallel: data-parallel mesh has {dp_mesh.size()} ranks, world size is "
                f"{world}; use llmstages.strategies.FSDP2Strategy (configs/fragments/fsdp.yaml)"
            )
        for block in self.backbone.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(self.backbone, mesh=dp_mesh)
        self._sharded = True

    def _compile(self) -> None:
        if self.hparams.compile and not getattr(self, "_compiled", False):
            for block in self.backbone.blocks:
                block.compile()  # in place: names, state_dict and FSDP wrapping unchanged
            self._compiled = True

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "embed" in name or "norm" in name else decay).append(param)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warmup = min(hp.warmup_steps, total // 2)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- the shared steps

    def compute_loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor | Weighted], Tensor | int]:
        """(loss for backward, detached stats of this micro-batch, the count they are means over)."""
        raise NotImplementedError

    def derived_metrics(self, means: dict[str, Tensor]) -> dict[str, Tensor]:
        """Metrics computed from the (averaged) stats, e.g. perplexity from the mean loss."""
        return {}

    def starts_step(self, batch: dict, batch_idx: int) -> bool:
        """Whether `batch` is the first micro-batch of an optimiser step."""
        return batch_idx % self.trainer.accumulate_grad_batches == 0

    def on_step_start(self, batch: dict) -> None:
        """Called once per optimiser step, at its first micro-batch, before any `compute_loss` of the step.

        A stage that prepares the whole step at once (GRPO's rollout) does it here.
        """

    def validation_stats(self, batch: dict, batch_idx: int) -> tuple[dict[str, Tensor | Weighted], Tensor | int]:
        """(stats, the count they are means over) of one validation batch; by default `compute_loss`'s."""
        _, stats, weight = self.compute_loss(batch)
        return stats, weight

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, stats, weight = self.compute_loss(batch)
        # the optimiser step's loss over all its micro-batches (and ranks, when logged): split-invariant
        weight = torch.as_tensor(weight, dtype=torch.float64, device=self.device)
        value = stats["loss"].detach().double()
        self._step_loss += torch.stack([value if self.STEP_LOSS == "sum" else value * weight, weight])
        values = {name: (s.value if isinstance(s, Weighted) else s) for name, s in stats.items()}
        values.update(self.derived_metrics(values))
        for name, value in values.items():
            self.log(f"train/{name}", value, prog_bar=name in self.PROGRESS_BAR, sync_dist=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        stats, weight = self.validation_stats(batch, batch_idx)
        for name, stat in stats.items():
            if name in self.METRICS:
                value, w = stat if isinstance(stat, Weighted) else (stat, weight)
                self.val_means.update(f"val/{name}", value, w)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.starts_step(batch, batch_idx):
            self._step_loss = torch.zeros(2, dtype=torch.float64, device=self.device)
            self._grad_norm = None
            self.on_step_start(batch)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._step_loss is not None:
            self.log("train/step_loss", self._reduced_step_loss().float(), sync_dist=False)
        # before clipping (Lightning clips after this hook): what the invariance suite compares
        if any(p.grad is not None for p in self.parameters()):  # none left when the guard skipped the step
            self.log("train/grad_norm", self.gradient_norm(), sync_dist=False)

    def gradient_norm(self) -> Tensor | None:
        """The global L2 norm of the gradients, measured once per optimiser step (None without gradients).

        Called from the `on_before_optimizer_step` hooks (logging, `NonFiniteGuard`), before clipping.
        """
        if self._grad_norm is None:
            params = [p for p in self.parameters() if p.grad is not None]
            if not params:
                return None
            # summed in the optimiser's order when it holds exactly these: clip_grad_norm_'s order, so the
            # clipping can reuse the norm bit for bit
            self._grad_norm_params = self._in_optimiser_order(params)
            grads = [p.grad for p in self._grad_norm_params or params]
            if any(hasattr(g, "full_tensor") for g in grads):
                # FSDP2: each norm is a DTensor on its parameter's mesh (meshes may differ): make each global first
                norms = [g.norm() for g in grads]
                norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
                self._grad_norm = torch.linalg.vector_norm(torch.stack(norms))
            else:
                self._grad_norm = torch.nn.utils.get_total_norm(grads)  # what clip_grad_norm_ measures
        return self._grad_norm

    def _in_optimiser_order(self, params: list[Tensor]) -> list[Tensor] | None:
        """`params` in the (single) optimiser's order, or None when it does not hold exactly them."""
        if self._trainer is None or len(self.trainer.optimizers) != 1:
            return None
        ordered = [p for group in self.trainer.optimizers[0].param_groups for p in group["params"] if p.grad is not None]
        return ordered if {id(p) for p in ordered} == {id(p) for p in params} else None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the norm `gradient_norm` already measured; Lightning's clipping wherever it differs."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not reuses_norm_for_clipping(self, gradient_clip_val, gradient_clip_algorithm, params):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._grad_norm)

    def _reduced_step_loss(self) -> Tensor:
        """`train/step_loss` over the step's micro-batches and ranks, as `STEP_LOSS` declares."""
        step_loss, world = self._step_loss, self.trainer.world_size
        if world > 1:
            step_loss = self.trainer.strategy.reduce(step_loss, reduce_op="sum")
        if self.STEP_LOSS == "sum":
            return step_loss[0] / world  # ranks averaged, as DDP averages their gradients
        return step_loss[0] / step_loss[1].clamp(min=1)

    def on_validation_epoch_end(self) -> None:
        means = self.val_means.compute_and_reset()
        means.update({f"val/{k}": v for k, v in self.derived_metrics({k[4:]: v for k, v in means.items()}).items()})
        self.log_scalars(means, prog_bar=True)

    # ----------------------------------------------------------------- helpers for the stages

    def step_counts(self, batch: dict, local_tokens: int | Tensor, local_sequences: int | Tensor) -> tuple[Tensor, Tensor]:
        """The optimiser step's target-token and sequence counts, summed over ranks.

        Training batches carry their step's local counts (see
        `llmstages.data.loader`); a batch without them (validation, a hand-made
        batch) is its own step.
        """
        tokens = batch.get("num_step_tokens", local_tokens)
        sequences = batch.get("num_step_sequences", local_sequences)
        counts = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=self.device) for c in (tokens, sequences)])
        if self._trainer is not None and self._trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        return counts[0], counts[1]

    @property
    def grad_scale(self) -> float:
        """Undoes Lightning's division by accumulate_grad_batches and DDP/FSDP's mean over ranks."""
        if self._trainer is None or not self.training:
            return 1.0
        return float(self.trainer.accumulate_grad_batches * self.trainer.world_size)

    def precision_context(self):
        """The trainer's autocast for forwards outside the training step (reference, rollout log-probs)."""
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()

    def log_scalars(self, values: dict[str, Tensor | float], **kwargs) -> None:
        kwargs.setdefault("sync_dist", False)
        for name, value in values.items():
            self.log(name, value, **kwargs)


def reuses_norm_for_clipping(module: StageModule, clip_val, algorithm, params: list[Tensor]) -> bool:
    """Whether clipping `params` (the optimiser's, with gradients) by `module`'s measured norm is exactly
    what Lightning's clipping would do here.

    That is: clipping by norm, a norm measured this step over plain (not sharded) gradients of
    exactly `params` in their order (the order `clip_grad_norm_` sums in), and the precision plugin that clips with `clip_grad_norm_` over the
    optimiser's parameters (float32, or autocast without a grad scaler).
    """
    if not clip_val or module._grad_norm is None or GradClipAlgorithmType(algorithm or "norm") != GradClipAlgorithmType.NORM:
        return False
    if module.trainer.gradient_clip_val not in (None, clip_val):
        return False  # Lightning's check of conflicting values stays in charge
    plugin = module.trainer.precision_plugin
    plain = type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)
    measured = module._grad_norm_params
    same = measured is not None and [id(p) for p in params] == [id(p) for p in measured]
    return plain and same and not any(hasattr(p.grad, "full_tensor") for p in params)


class LMStage(StageModule):
    """A stage whose loss scores tokens through the output layer (pretrain, SFT, DPO, GRPO)."""

    def __init__(self, normalize: Normalize = "token", chunk_size: int = DEFAULT_CHUNK_SIZE, **kwargs) -> None:
        """
        Args:
            normalize: how token losses are normalised: token (sum / target tokens of the whole optimiser step,
                across accumulation and ranks), micro_batch (mean per micro-batch: the pre-fix HF behaviour),
                sequence (mean of per-sequence means), sum.
            chunk_size: target positions per chunk when scoring targets (bounds the logits' memory; the default,
                `losses.DEFAULT_CHUNK_SIZE`, is chosen by benchmarks/loss_memory.py).
        """
        check_choice("normalize", normalize, NORMALIZE_MODES)
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        super().__init__(**kwargs)

    def target_logps(
        self, input_ids: Tensor, labels: Tensor, position_ids: Tensor | None = None,
        document_ids: Tensor | None = None, return_correct: bool = False, model: Transformer | None = None,
    ):
        """Per-position log-probabilities of the (shifted) targets, chunked through the output layer."""
        model = self.backbone if model is None else model
        head = lambda hidden, weight: token_logps(  # noqa: E731
            hidden, weight, labels, chunk_size=self.hparams.chunk_size, return_correct=return_correct
        )
        return model(input_ids, position_ids=position_ids, document_ids=document_ids, head=head)
