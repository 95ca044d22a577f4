"""KTOModule: unpaired desirable / undesirable completions against a frozen reference (TRL 1.16's meanings).

Loss (`losses.kto_loss`): with `r = logp - ref_logp` of the summed completion log-probs, a desirable
example costs `desirable_weight * (1 - sigmoid(beta (r - z0)))`, an undesirable one
`undesirable_weight * (1 - sigmoid(beta (z0 - r)))`; the loss is their mean over the step's examples.

Design choices:
- z0, the reference point, is the mean `policy - reference` log-ratio of mismatched prompt/completion
  pairs (`data/kto.py` builds one per example), detached, clamped at 0 (`losses.kto_reference_point`).
  **Where it is averaged is the named choice `kl_reference`:**
    step         (default) every mismatched pair of the optimiser step, all micro-batches and ranks,
                 computed once at the step's start (`on_step_start`), before its first backward. One
                 step's gradient then does not depend on how the step is split or on the world size.
    micro_batch  TRL's: the mean over this micro-batch's pairs, averaged over ranks (a mean of rank
                 means, as TRL's `gather_for_metrics(kl).mean()`). Its gradient depends on the
                 micro-batch size and the world size (TRL PR #2153 chose the micro-batch on purpose).
  In both, the pairs are fixed per example (not per micro-batch), so shuffling is allowed (TRL forbids
  it), odd micro-batches mismatch correctly (TRL #1911), and a scope without any mismatched pair gives
  z0 = 0, never NaN (TRL PR #1380). TRL 1.16 cycles completions within each micro-batch instead: the
  z0 *formula and scope* of `micro_batch` are TRL's, its pairs are drawn from the split.
- The frozen reference is `stages/reference.py`'s (a copy of the initial policy, or LoRA adapters off).
- TRL's warning when `desirable_weight * n_desirable / (undesirable_weight * n_undesirable)` leaves
  [1, 4/3] (the KTO paper's recommended range; TRL's rounded bounds) is given once, at set-up, from
  the training split.
- Logged as TRL logs them: `kl` (z0), `rewards/chosen`, `rewards/rejected` (beta * r over desirable
  and undesirable examples), `logps/chosen`, `logps/rejected` (summed), `rewards/margins`, with the
  counts `count/desirable`, `count/undesirable`; the per-class stats are means over their own class.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from llmstages.errors import ConfigError
from llmstages.data.kto import KL_KEYS
from llmstages.losses import kto_loss, kto_reference_point, reduce_pair_loss, sequence_logps, target_mask
from llmstages.options import KLReference, check_choice, choices
from llmstages.stages.base import Weighted
from llmstages.stages.reference import ReferenceStage

__all__ = ["KTOModule", "check_class_weights"]


def check_class_weights(num_desirable: int, num_undesirable: int, desirable_weight: float, undesirable_weight: float) -> None:
    """TRL's warning (the KTO paper's eq. 8): neither weight puts w_D n_D / (w_U n_U) in [1, 4/3].

    As TRL: equal class counts never warn, the bounds are rounded to two decimals (4/3 as 1.33) and
    a missing class counts as one example.
    """
    n_d, n_u = max(num_desirable, 1), max(num_undesirable, 1)
    if n_d == n_u:
        return
    des = (round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2))
    und = (round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2))
    if not (des[0] <= desirable_weight <= des[1] or und[0] <= undesirable_weight <= und[1]):
        warnings.warn(
            f"KTO: {num_desirable} desirable and {num_undesirable} undesirable examples, weighted "
            f"{desirable_weight} and {undesirable_weight}: w_D n_D / (w_U n_U) is outside the recommended [1, 4/3]; "
            f"set EITHER desirable_weight in [{des[0]}, {des[1]}] OR undesirable_weight in [{und[0]}, {und[1]}]",
            stacklevel=2,
        )


class KTOModule(ReferenceStage):
    METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "count/desirable", "count/undesirable")
    PROGRESS_BAR = ("kl",)

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        kl_reference: KLReference = "step",
        **kwargs,
    ) -> None:
        """
        Args:
            beta: inverse temperature of the implicit reward.
            desirable_weight: weight of the desirable examples' losses (lambda_D).
            undesirable_weight: weight of the undesirable examples' losses (lambda_U).
            kl_reference: step (z0 over every mismatched pair of the optimiser step: split-invariant) or micro_batch
                (TRL's: z0 per micro-batch, averaged over ranks; depends on the micro-batch size and world size).
        """
        super().__init__(**kwargs)
        check_choice("kl_reference", kl_reference, choices(KLReference))
        if beta <= 0 or desirable_weight < 0 or undesirable_weight < 0:
            raise ConfigError(f"beta must be > 0 and the class weights >= 0, got {beta}, {desirable_weight}, {undesirable_weight}")
        self._step_z0: Tensor | None = None

    def needs_reference(self) -> bool:
        return True

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and data is not None and hasattr(data, "class_counts"):
            check_class_weights(*data.class_counts(), self.hparams.desirable_weight, self.hparams.undesirable_weight)

    # ----------------------------------------------------------------- z0

    @torch.no_grad()
    def kl_log_ratios(self, batch: dict, prefix: str = "kl_") -> Tensor:
        """`[K]` policy - reference summed log-probs of the valid mismatched rows under `prefix` (kl_ or step_kl_)."""
        # every row runs (the same forwards on every rank, as FSDP needs); the invalid ones are dropped after
        rows = {key: batch[f"{prefix}{key}"] for key in KL_KEYS}
        policy = self._summed(rows)
        with self.frozen_reference.model(self.backbone) as reference:
            ref = self._summed(rows, reference)
        return (policy - ref)[batch[f"{prefix}valid"]]

    def _summed(self, rows: dict, model=None) -> Tensor:
        logps = self.target_logps(rows["input_ids"], rows["labels"], rows["position_ids"], model=model)
        return sequence_logps(logps, rows["labels"], "sum")

    def _ranks_sum(self, values: Tensor) -> Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(values, reduce_op="sum")
        return values

    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def reference_point(self, batch: dict) -> Tensor:
        """z0 for this micro-batch, per `kl_reference` (a validation batch is its own step)."""
        if self.hparams.kl_reference == "micro_batch":
            ratios = self.kl_log_ratios(batch)
            local = ratios.double().mean() if ratios.numel() else torch.zeros((), dtype=torch.float64, device=self.device)
            return (self._ranks_sum(local) / self._world()).clamp(min=0).float()
        if self.training and "step_kl_valid" in batch:
            if self._step_z0 is None:  # a resume inside a step: its first micro-batch did not run here
                self._step_z0 = self._step_reference_point(batch, "step_kl_")
            return self._step_z0
        return self._step_reference_point(batch, "kl_")

    def _step_reference_point(self, batch: dict, prefix: str) -> Tensor:
        """z0 over every valid mismatched row under `prefix` on every rank: the summed log-ratios / their count."""
        ratios = self.kl_log_ratios(batch, prefix).double()
        total = self._ranks_sum(torch.stack([ratios.sum(), ratios.new_tensor(float(ratios.numel()))]))
        return kto_reference_point(total[:1], count=int(total[1])).float()

    def on_step_start(self, batch: dict) -> None:
        self._step_z0 = None
        if self.hparams.kl_reference == "step" and "step_kl_valid" in batch:
            with self.precision_context():
                self._step_z0 = self._step_reference_point(batch, "step_kl_")

    # ----------------------------------------------------------------- loss

    def compute_loss(self, batch: dict):
        hp = self.hparams
        z0 = self.reference_point(batch)
        logps = self._summed(batch)
        with torch.no_grad(), self.frozen_reference.model(self.backbone) as reference:
            ref = self._summed(batch, reference)
        desirable = batch["label"].to(torch.bool)
        losses, rewards = kto_loss(
            logps, ref, desirable, z0, beta=hp.beta,
            desirable_weight=hp.desirable_weight, undesirable_weight=hp.undesirable_weight,
        )
        _, step_examples = self.step_counts(batch, int(target_mask(batch["labels"]).sum()), len(losses))
        loss = reduce_pair_loss(losses, step_examples, self.grad_scale)
        n_d, n_u = desirable.sum(), (~desirable).sum()
        class_mean = lambda v, m, n: Weighted((v * m).sum() / n.clamp(min=1), n)  # noqa: E731
        logps = logps.detach()
        undesirable = ~desirable
        stats = {
            "loss": losses.mean().detach(),
            "kl": z0.detach(),
            "rewards/chosen": class_mean(rewards, desirable, n_d),
            "rewards/rejected": class_mean(rewards, undesirable, n_u),
            "logps/chosen": class_mean(logps, desirable, n_d),
            "logps/rejected": class_mean(logps, undesirable, n_u),
            "count/desirable": n_d.float(),
            "count/undesirable": n_u.float(),
        }
        if bool(n_d) and bool(n_u):
            margin = stats["rewards/chosen"].value - stats["rewards/rejected"].value
            stats["rewards/margins"] = Weighted(margin, torch.minimum(n_d, n_u))
        return loss, stats, len(losses)
