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
from lightning.pytorch.utilities import rank_zero_info

from llmstages.losses import target_mask
from llmstages.metrics import WeightedMeans
from llmstages.model.generate import generate
from llmstages.stages.pretrain import PretrainModule


def reply_starts(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose target is the first token of a labelled run (a reply's first token)."""
    mask = target_mask(labels)
    starts = mask.clone()
    starts[:, 1:] &= ~mask[:, :-1]
    return starts


class SFTModule(PretrainModule):
    def __init__(self, generate_samples: int = 8, max_new_tokens: int = 32, **kwargs) -> None:
        """
        Args:
            generate_samples: validation prompts generated from greedily each validation epoch (0: none).
            max_new_tokens: generation budget per prompt.
        """
        super().__init__(**kwargs)
        self.first_token = WeightedMeans("val/first_reply_token_acc")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, stats = self.next_token_loss(batch)
        self.val_means.update("val/loss", stats["nll_mean"], stats["tokens"])
        self.val_means.update("val/token_acc", stats["token_acc"], stats["tokens"])
        starts = reply_starts(batch["labels"])
        n = starts.sum()
        if n > 0:
            self.first_token.update("val/first_reply_token_acc", (stats["correct"] & starts).sum() / n, n)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_scalars(self.first_token.compute_and_reset())
        if self.hparams.generate_samples > 0 and self._trainer is not None and not self.trainer.sanity_checking:
            # every rank generates: under FSDP each forward all-gathers weights with all ranks
            self._generation_checks()

    def _generation_checks(self) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if data is None or not hasattr(data, "generation_prompts"):
            return
        prompts = data.generation_prompts(self.hparams.generate_samples)
        if not prompts:
            return
        stop_id, stopped, exact, rows = data.stop_token_id, 0, 0, []
        was_training = self.backbone.training
        self.backbone.eval()
        for prompt, reference in prompts:
            new, did_stop = generate(
                self.backbone, prompt, self.hparams.max_new_tokens, stop_id=stop_id,
                fixed_steps=self.trainer.world_size > 1,
            )
            reply = data.tokenizer.decode(new, skip_special_tokens=True)
            stopped += did_stop
            exact += did_stop and reply.strip() == reference.strip()
            rows.append([data.tokenizer.decode(prompt), reply, reference, did_stop])
        self.backbone.train(was_training)
        # every rank generated the same prompts: logged without cross-rank sync
        self.log("val/stop_rate", stopped / len(prompts), rank_zero_only=True)
        self.log("val/exact_match", exact / len(prompts), rank_zero_only=True)
        for prompt_text, reply, reference, did_stop in rows[:3]:
            rank_zero_info(f"[sample] {reply!r} (reference {reference!r}, stopped={did_stop})")
        logger = self.logger
        if self.trainer.is_global_zero and logger is not None and hasattr(logger, "log_text"):
            logger.log_text(key="val/samples", columns=["prompt", "reply", "reference", "stopped"], data=rows)
