"""DPOModule: a policy trained against a frozen reference on preference pairs.

Design choices:
- The reference is the frozen initial policy of `stages/reference.py` (a copy
  outside state_dict, optimiser and checkpoints, rebuilt from `init_from` on
  load; with LoRA the policy with its adapters disabled), shared with GRPO.
- `reference: precompute` scores every training and validation pair with the
  reference once before training, keeps two numbers per pair and frees the
  reference model.
- Chosen and rejected run in one concatenated forward pass; `pair_logps`
  returns both sequence log-probs and the token log-probs they came from
  (the SFT term needs those), never through state on `self`.
- `logp_reduction` defaults to `sum`; `ipo` and `simpo` default to `mean`,
  as their papers prescribe. The loss is averaged over the optimiser step's
  pairs (all micro-batches, all ranks); the optional SFT term (`sft_weight`,
  RPO) is the chosen replies' token NLL, normalised by `normalize`.
- Logged names keep TRL's meanings: rewards/chosen, rewards/rejected,
  rewards/accuracies, rewards/margins (beta * summed policy - reference
  log-probs), logps/chosen, logps/rejected (summed), whatever
  `logp_reduction` trains with; what the loss actually compared logs as
  logps_reduced/* and rewards_reduced/* (the same numbers under `sum`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from rich.progress import track
from torch import Tensor

from llmstages.losses import (
    DPO_LOSS_TYPES,
    LOGP_REDUCTIONS,
    dpo_loss,
    reduce_pair_loss,
    reduce_token_loss,
    sequence_logps,
    target_mask,
)
from llmstages.options import DPOLossType, LogpReduction, Reference, check_choice, choices
from llmstages.stages.base import concat_pairs
from llmstages.stages.reference import ReferenceStage

_SIDES = ("chosen", "rejected")


class PairLogps(NamedTuple):
    """Sequence log-probs of both sides `[B]`, and the token log-probs `[2B, T]` (chosen rows first)."""

    chosen: Tensor
    rejected: Tensor
    token_logps: Tensor


def summed_logps(token_logps: Tensor, batch: dict) -> tuple[Tensor, Tensor]:
    """Chosen and rejected summed log-probs `[B]` from `pair_logps`'s token log-probs."""
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    chosen, rejected = sequence_logps(token_logps, labels, "sum").chunk(2)
    return chosen, rejected


class DPOModule(ReferenceStage):
    METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "logps_reduced/chosen", "logps_reduced/rejected",
               "rewards_reduced/accuracies", "rewards_reduced/margins")
    PROGRESS_BAR = ("rewards/accuracies",)

    def __init__(
        self,
        loss_type: DPOLossType = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        length_alpha: float = 0.0,
        sft_weight: float = 0.0,
        logp_reduction: LogpReduction | None = None,
        reference: Reference = "live",
        **kwargs,
    ) -> None:
        """
        Args:
            loss_type: sigmoid (DPO), ipo, hinge, robust (rDPO label smoothing), simpo (reference-free).
            beta: inverse temperature of the implicit reward.
            label_smoothing: assumed label-noise rate (sigmoid: cDPO; robust: rDPO).
            gamma: SimPO's target reward margin.
            length_alpha: R-DPO length regulariser on |chosen| - |rejected| reply tokens.
            sft_weight: weight of an NLL term on the chosen replies (RPO); 0 disables it.
            logp_reduction: sum, mean or legacy_mean_padded; None: sum (mean for ipo and simpo).
            reference: live (a frozen copy runs each step) or precompute (one pass before training).
        """
        super().__init__(**kwargs)
        check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
        check_choice("reference", reference, choices(Reference))
        if logp_reduction is None:
            logp_reduction = "mean" if loss_type in ("ipo", "simpo") else "sum"
        self.logp_reduction = check_choice("logp_reduction", logp_reduction, LOGP_REDUCTIONS)
        self.reference_free = loss_type == "simpo"
        self._ref_tables: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- reference

    def needs_reference(self) -> bool:
        return not self.reference_free and not self._ref_tables

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.reference == "precompute" and self._has_reference() and not self._ref_tables:
            self.precompute_reference(self.trainer.datamodule)

    def _has_reference(self) -> bool:
        return not self.reference_free and self.frozen_reference.available()

    @torch.no_grad()
    def precompute_reference(self, data) -> None:
        """Score every train/validation pair with the reference once, then free the reference.

        Each pair keeps four numbers: chosen/rejected log-probs as the loss reduces them
        and as sums (what the logged rewards use).
        """
        for split, dataset in (("train", data.train_set), ("val", data.val_set)):
            if not dataset:
                continue
            table = torch.zeros(len(dataset), 4, dtype=torch.float64)
            loader = torch.utils.data.DataLoader(dataset, batch_size=data.batch_size, collate_fn=data.collate)
            for batch in track(loader, description=f"reference log-probs ({split})", disable=len(loader) < 50):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with self.precision_context():  # the same autocast as the live reference gets
                    table[batch["index"].cpu()] = self._reference_columns(batch).double().cpu()
            self._ref_tables[split] = table
        self.frozen_reference.free()
        rank_zero_info("reference log-probs precomputed; reference model freed")

    # ----------------------------------------------------------------- loss

    def pair_logps(self, batch: dict, model=None) -> PairLogps:
        """Both sides' sequence log-probs under `model` (the policy by default), reduced by `logp_reduction`."""
        both = concat_pairs(batch)
        logps = self.target_logps(both["input_ids"], both["labels"], both["position_ids"], model=model)
        chosen, rejected = sequence_logps(logps, both["labels"], self.logp_reduction).chunk(2)
        return PairLogps(chosen, rejected, logps)

    def _reference_columns(self, batch: dict) -> Tensor:
        """`[B, 4]`: the reference's reduced chosen, reduced rejected, summed chosen, summed rejected log-probs."""
        with torch.no_grad(), self.frozen_reference.model(self.backbone) as reference:
            chosen, rejected, token_logps = self.pair_logps(batch, reference)
        return torch.stack([chosen, rejected, *summed_logps(token_logps, batch)], dim=1)

    def _reference_logps(self, batch: dict) -> Tensor | None:
        if self.reference_free:
            return None
        if self._ref_tables:
            table = self._ref_tables["train" if self.training else "val"]
            return table[batch["index"].cpu()].to(self.device, torch.float32)
        return self._reference_columns(batch)

    def compute_loss(self, batch: dict):
        ref = self._reference_logps(batch)
        ref_c, ref_r = (None, None) if ref is None else (ref[:, 0], ref[:, 1])
        pol_c, pol_r, token_logps = self.pair_logps(batch)
        hp = self.hparams
        lengths = {side: target_mask(batch[f"{side}_labels"]).sum(1) for side in _SIDES}
        losses, loss_rew_c, loss_rew_r = dpo_loss(
            pol_c, pol_r, ref_c, ref_r,
            loss_type=hp.loss_type, beta=hp.beta, label_smoothing=hp.label_smoothing, gamma=hp.gamma,
            length_alpha=hp.length_alpha, chosen_lengths=lengths["chosen"], rejected_lengths=lengths["rejected"],
        )
        step_tokens, step_pairs = self.step_counts(batch, int(lengths["chosen"].sum()), len(losses))
        loss = reduce_pair_loss(losses, step_pairs, self.grad_scale)
        if hp.sft_weight > 0:
            # the SFT term trains the chosen replies' tokens; the data counts those per step (num_step_tokens)
            chosen_nll = -token_logps[: len(losses)]
            loss = loss + hp.sft_weight * reduce_token_loss(
                chosen_nll, batch["chosen_labels"], normalize=hp.normalize,
                num_step_tokens=step_tokens, num_step_sequences=step_pairs, grad_scale=self.grad_scale,
            )
        # TRL's metric meanings: rewards and logps from summed log-probs, whatever the loss reduces with
        sum_c, sum_r = (x.detach() for x in summed_logps(token_logps, batch))
        ref_sum_c, ref_sum_r = (0.0, 0.0) if ref is None else (ref[:, 2], ref[:, 3])
        rew_c, rew_r = hp.beta * (sum_c - ref_sum_c), hp.beta * (sum_r - ref_sum_r)
        stats = {
            "loss": losses.mean().detach(),
            "rewards/chosen": rew_c.mean(),
            "rewards/rejected": rew_r.mean(),
            "rewards/accuracies": (rew_c > rew_r).float().mean(),
            "rewards/margins": (rew_c - rew_r).mean(),
            "logps/chosen": sum_c.mean(),
            "logps/rejected": sum_r.mean(),
            # what the loss compared: `logp_reduction`'s log-probs and their implicit rewards
            "logps_reduced/chosen": pol_c.detach().mean(),
            "logps_reduced/rejected": pol_r.detach().mean(),
            "rewards_reduced/accuracies": (loss_rew_c > loss_rew_r).float().mean(),
            "rewards_reduced/margins": (loss_rew_c - loss_rew_r).mean(),
        }
        return loss, stats, len(losses)
