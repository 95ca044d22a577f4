"""PretrainModule: masked next-token prediction over every labelled token.

SFT trains with exactly this loss on differently masked batches, so
`SFTModule` extends this class with its validation extras only.
"""

from __future__ import annotations

import torch

from llmstages.losses import count_sequences, reduce_token_loss, target_mask
from llmstages.metrics import WeightedMeans
from llmstages.stages.base import StageModule


class PretrainModule(StageModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.val_means = WeightedMeans("val/loss", "val/token_acc")
        self.tokens_seen = 0

    def next_token_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        logps, correct = self.token_logps(
            batch["input_ids"], labels, batch.get("position_ids"), batch.get("document_ids"), return_correct=True
        )
        mask = target_mask(labels)
        local_tokens = mask.sum()
        local_sequences = count_sequences(labels, batch.get("document_ids"))
        step_tokens, step_sequences = self.step_counts(batch, int(local_tokens), local_sequences)
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
        stats = {
            "nll_mean": -logps.sum().detach() / n,  # per-token, whatever `normalize` is
            "token_acc": correct.sum() / n,
            "tokens": local_tokens,
            "correct": correct,
        }
        return loss, stats

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tokens_seen = checkpoint.get("tokens_seen", 0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, stats = self.next_token_loss(batch)
        self.tokens_seen += int(batch["input_ids"].numel()) * self.trainer.world_size
        self.log_scalars(
            {"train/loss": stats["nll_mean"], "train/token_acc": stats["token_acc"], "train/ppl": stats["nll_mean"].exp()},
            prog_bar=True,
        )
        self.log("train/tokens_seen", float(self.tokens_seen))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, stats = self.next_token_loss(batch)
        self.val_means.update("val/loss", stats["nll_mean"], stats["tokens"])
        self.val_means.update("val/token_acc", stats["token_acc"], stats["tokens"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_means.compute_and_reset()
        if "val/loss" in values:
            values["val/ppl"] = values["val/loss"].exp()
        self.log_scalars(values, prog_bar=True)
