"""SFTModule: the next-token loss on replies only, plus checks that matter for chat.

The loss is `PretrainModule`'s; what is trained is decided by the data's
`loss_mask`. Validation adds what SFT bugs break first:
- `val/first_reply_token_acc`: accuracy on the first token of every labelled
  run (OpenRLHF #973 left exactly these tokens untrained);
- `val/stop_rate`: greedy generation on a few validation prompts ends with
  the end-of-turn token (TRL #1623: pad == EOS taught models never to stop);
- `val/exact_match`: the generated reply equals the reference reply;
- a few sample generations, printed and sent to the logger when it takes text.
"""

from __future__ import annotations

import torch

from llmstages.losses import target_mask
from llmstages.evaluation import evaluate_replies, log_reply_samples
from llmstages.stages.base import Weighted
from llmstages.stages.pretrain import PretrainModule


def reply_starts(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose target is the first token of a labelled run (a reply's first token)."""
    mask = target_mask(labels)
    starts = mask.clone()
    starts[:, 1:] &= ~mask[:, :-1]
    return starts


class SFTModule(PretrainModule):
    METRICS = ("loss", "token_acc", "first_reply_token_acc")

    def __init__(self, generate_samples: int = 8, max_new_tokens: int = 32, **kwargs) -> None:
        """
        Args:
            generate_samples: validation prompts generated from greedily each validation epoch (0: none).
            max_new_tokens: generation budget per prompt.
        """
        super().__init__(**kwargs)

    def compute_loss(self, batch: dict):
        loss, stats, tokens, correct = self.lm_loss(batch)
        if not self.training:
            starts = reply_starts(batch["labels"])
            n = starts.sum()
            stats["first_reply_token_acc"] = Weighted((correct & starts).sum() / n.clamp(min=1), n)
        return loss, stats, tokens

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.hparams.generate_samples > 0 and self._trainer is not None and not self.trainer.sanity_checking:
            # every rank generates: under FSDP each forward all-gathers weights with all ranks
            self._generation_checks()

    def _generation_checks(self) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if data is None or not hasattr(data, "generation_prompts"):
            return
        cases = data.generation_prompts(self.hparams.generate_samples)
        if not cases:
            return
        quality = evaluate_replies(
            self.backbone, [p for p, _ in cases], [r for _, r in cases], data.stop_token_id, data.tokenizer,
            self.hparams.max_new_tokens, fixed_steps=self.trainer.world_size > 1,
        )
        # every rank generated the same prompts: logged without cross-rank sync
        self.log("val/stop_rate", quality["stop_rate"], rank_zero_only=True)
        self.log("val/exact_match", quality["exact_match"], rank_zero_only=True)
        log_reply_samples(self, quality["samples"])
