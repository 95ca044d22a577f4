"""PretrainModule: masked next-token prediction over every labelled token.

SFT trains with exactly this loss on differently masked batches, so
`SFTModule` extends this class with its validation extras only. The loss is
`losses.reduce_token_loss` under the stage's `normalize`; the logged
`loss` is the per-token NLL whatever `normalize` is, so runs that differ only
in normalisation log comparable numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmstages.losses import count_sequences, reduce_token_loss, target_mask
from llmstages.stages.base import LMStage


class PretrainModule(LMStage):
    METRICS = ("loss", "token_acc")
    PROGRESS_BAR = ("loss", "token_acc", "ppl")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tokens_seen = 0

    def compute_loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        loss, stats, tokens, _ = self.lm_loss(batch)
        return loss, stats, tokens

    def lm_loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """`compute_loss` plus the `[B, T]` map of correctly predicted targets (for SFT's reply checks)."""
        labels = batch["labels"]
        logps, correct = self.target_logps(
            batch["input_ids"], labels, batch.get("position_ids"), batch.get("document_ids"), return_correct=True
        )
        local_tokens = target_mask(labels).sum()
        local_sequences = count_sequences(labels, batch.get("document_ids"))
        step_tokens, step_sequences = self.step_counts(batch, local_tokens, local_sequences)  # a tensor: no host sync
        loss = reduce_token_loss(
            -logps,
            labels,
            normalize=self.hparams.normalize,
            num_step_tokens=step_tokens,
            num_step_sequences=step_sequences,
            grad_scale=self.grad_scale,
            document_ids=batch.get("document_ids"),
        )
        n = local_tokens.clamp(min=1)
        stats = {"loss": -logps.sum().detach() / n, "token_acc": correct.sum() / n}
        return loss, stats, local_tokens, correct

    def derived_metrics(self, means: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"ppl": means["loss"].exp()} if "loss" in means else {}

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.tokens_seen += int(batch["input_ids"].numel()) * self.trainer.world_size
        self.log("train/tokens_seen", float(self.tokens_seen))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
