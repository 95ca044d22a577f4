"""RewardModule: the backbone plus a scalar head, trained on preference pairs.

Design choices:
- The reward is read at the last labelled token of each sequence (the
  reply's end-of-turn token), found from the labels, never from the padding:
  right-padded and packed batches read the same place.
- Chosen and rejected run in one forward pass (concatenated along the batch).
- Loss: `-logsigmoid(r_c - r_r - margin)` with optional reward centring
  (`center_coef * (r_c + r_r)^2`), averaged over the optimiser step's pairs
  (all micro-batches, all ranks), like `normalize: token` averages tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from llmstages.losses import last_target_positions, reward_loss
from llmstages.metrics import WeightedMeans
from llmstages.stages.base import StageModule, concat_pairs


class RewardModule(StageModule):
    def __init__(self, margin: float = 0.0, center_coef: float = 0.0, **kwargs) -> None:
        """
        Args:
            margin: required reward gap between chosen and rejected.
            center_coef: weight of the reward-centring term that keeps rewards near zero.
        """
        super().__init__(**kwargs)
        if self.hparams.normalize != "token":
            raise ValueError("RewardModule has no token loss: `normalize` does not apply (its loss is a mean over pairs)")
        if self.backbone.lm_head is not None:
            # never used by a reward model; frozen so DDP does not wait for its gradient
            self.backbone.lm_head.requires_grad_(False)
        self.value_head = nn.Linear(self.config.d_model, 1, bias=False)
        nn.init.normal_(self.value_head.weight, std=1.0 / (self.config.d_model + 1) ** 0.5)
        self.val_means = WeightedMeans("val/loss", "val/accuracy", "val/margin", "val/reward")

    def rewards(self, input_ids, labels, position_ids=None, document_ids=None) -> torch.Tensor:
        """One scalar per sequence (per document for packed rows)."""
        rows, cols = last_target_positions(labels, document_ids)
        head = lambda hidden, weight: self.value_head(hidden[rows, cols]).squeeze(-1)  # noqa: E731
        return self.backbone(input_ids, position_ids=position_ids, document_ids=document_ids, head=head)

    def pair_rewards(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        both = concat_pairs(batch)
        r = self.rewards(both["input_ids"], both["labels"], both["position_ids"])
        return r.chunk(2)

    def _loss(self, batch: dict):
        r_chosen, r_rejected = self.pair_rewards(batch)
        losses = reward_loss(r_chosen, r_rejected, margin=self.hparams.margin, center_coef=self.hparams.center_coef)
        _, step_pairs = self.step_counts(batch, 0, len(losses))
        loss = losses.sum() * self.grad_scale / step_pairs.to(losses.dtype)  # counts are float64: keep the loss dtype
        return loss, losses, r_chosen.detach(), r_rejected.detach()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, losses, rc, rr = self._loss(batch)
        self.log_scalars(
            {"train/loss": losses.mean(), "train/accuracy": (rc > rr).float().mean(), "train/margin": (rc - rr).mean()},
            prog_bar=True,
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, losses, rc, rr = self._loss(batch)
        n = len(losses)
        self.val_means.update("val/loss", losses.mean(), n)
        self.val_means.update("val/accuracy", (rc > rr).float().mean(), n)
        self.val_means.update("val/margin", (rc - rr).mean(), n)
        self.val_means.update("val/reward", torch.cat([rc, rr]).mean(), 2 * n)

    def on_validation_epoch_end(self) -> None:
        self.log_scalars(self.val_means.compute_and_reset(), prog_bar=True)

    def configure_model(self) -> None:
        super().configure_model()
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None and not getattr(self, "_head_sharded", False):
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.value_head, mesh=mesh)  # else its gradient would not be reduced across ranks
            self._head_sharded = True
