"""RewardModule: the backbone plus a scalar head, trained on preference pairs.

Design choices:
- The reward is read at the last labelled token of each sequence (the
  reply's end-of-turn token), found from the labels, never from the padding:
  right-padded and packed batches read the same place.
- Chosen and rejected run in one forward pass (concatenated along the batch).
- Loss: `-logsigmoid(r_c - r_r - margin)` with optional reward centring
  (`center_coef * (r_c + r_r)^2`), averaged over the optimiser step's pairs
  (all micro-batches, all ranks; `losses.reduce_pair_loss`), like
  `normalize: token` averages tokens. There is no token loss, so the stage
  takes neither `normalize` nor `chunk_size`.
"""

from __future__ import annotations

import torch
from torch import nn

from llmstages.losses import last_target_positions, reduce_pair_loss, reward_loss
from llmstages.stages.base import StageModule, concat_pairs, data_parallel_mesh


class RewardModule(StageModule):
    METRICS = ("loss", "accuracy", "margin", "reward")
    PROGRESS_BAR = ("loss", "accuracy", "margin")

    def __init__(self, margin: float = 0.0, center_coef: float = 0.0, **kwargs) -> None:
        """
        Args:
            margin: required reward gap between chosen and rejected.
            center_coef: weight of the reward-centring term that keeps rewards near zero.
        """
        super().__init__(**kwargs)
        if self.backbone.lm_head is not None:
            # never used by a reward model; frozen so DDP does not wait for its gradient
            self.backbone.lm_head.requires_grad_(False)
        self.value_head = nn.Linear(self.config.d_model, 1, bias=False)
        nn.init.normal_(self.value_head.weight, std=1.0 / (self.config.d_model + 1) ** 0.5)

    def rewards(self, input_ids, labels, position_ids=None, document_ids=None) -> torch.Tensor:
        """One scalar per sequence (per document for packed rows)."""
        rows, cols = last_target_positions(labels, document_ids)
        head = lambda hidden, weight: self.value_head(hidden[rows, cols]).squeeze(-1)  # noqa: E731
        return self.backbone(input_ids, position_ids=position_ids, document_ids=document_ids, head=head)

    def pair_rewards(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        both = concat_pairs(batch)
        r = self.rewards(both["input_ids"], both["labels"], both["position_ids"])
        return r.chunk(2)

    def compute_loss(self, batch: dict):
        r_chosen, r_rejected = self.pair_rewards(batch)
        losses = reward_loss(r_chosen, r_rejected, margin=self.hparams.margin, center_coef=self.hparams.center_coef)
        _, step_pairs = self.step_counts(batch, 0, len(losses))
        loss = reduce_pair_loss(losses, step_pairs, self.grad_scale)
        rc, rr = r_chosen.detach(), r_rejected.detach()
        stats = {
            "loss": losses.detach().mean(),
            "accuracy": (rc > rr).float().mean(),
            "margin": (rc - rr).mean(),
            "reward": torch.cat([rc, rr]).mean(),
        }
        return loss, stats, len(losses)

    def configure_model(self) -> None:
        super().configure_model()
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None and not getattr(self, "_head_sharded", False):
            from torch.distributed.fsdp import fully_shard

            # the backbone's data-parallel mesh: one mesh for every gradient, so clipping and norms combine them
            fully_shard(self.value_head, mesh=data_parallel_mesh(mesh))  # else its gradient would not be reduced
            self._head_sharded = True
