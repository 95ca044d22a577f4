"""ORPOModule: SFT and an odds-ratio preference term in one stage, without a reference model.

`loss = NLL(chosen) - beta * logsigmoid(log odds(chosen) - log odds(rejected))` (the paper's lambda is
TRL's `beta`), odds from **mean** completion log-probs through `losses.log1mexp` (`losses.orpo_log_odds`).

Design choices:
- Its own stage (not a DPO `loss_type`): ORPO has no reference and its NLL term is not optional, so
  DPO's reference, `logp_reduction` and `sft_weight` would all be options that mean nothing here.
  It reads the same `PreferenceData` (same masks, templates, truncation) and runs chosen and
  rejected in one forward pass (`base.concat_pairs`), as DPO does.
- `nll_scope` is the named pitfall: frameworks disagree on which tokens the NLL trains. TRL trains
  prompt + chosen reply (parity with the original repository), LLaMA-Factory the chosen reply only.
  The default, `completion`, is what every other stage here trains (the reply, `loss_mask`);
  `prompt_and_completion` reproduces TRL. The stage tells its data module the scope
  (`PreferenceData.sft_scope`), so the step's token counts are of the tokens the NLL trains.
- The NLL is normalised by `normalize` across the step, as SFT's (`losses.reduce_token_loss`); the
  odds-ratio term is a mean over the step's pairs (`losses.reduce_pair_loss`). TRL averages both per
  micro-batch: the same numbers when the step is one micro-batch.
- `train/step_loss` is the step's objective exactly (each micro-batch's `loss` stat is its share of it
  per pair), so it is split-invariant with `normalize: token`.
- Logged with TRL's names and meanings: `nll_loss`, `log_odds_ratio` (mean logsigmoid of the log
  odds), `log_odds_chosen` (mean log odds), `rewards/*` (beta * mean completion log-probs),
  `logps/*` (mean completion log-probs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmstages.errors import ConfigError
from llmstages.data.preference import with_prompt_labels
from llmstages.losses import orpo_log_odds, reduce_pair_loss, reduce_token_loss, sequence_logps, target_mask
from llmstages.options import ORPONLLScope, check_choice, choices
from llmstages.stages.base import LMStage, concat_pairs

__all__ = ["ORPOModule"]


class ORPOModule(LMStage):
    METRICS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
               "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    PROGRESS_BAR = ("rewards/accuracies",)

    def __init__(self, beta: float = 0.1, nll_scope: ORPONLLScope = "completion", **kwargs) -> None:
        """
        Args:
            beta: weight of the odds-ratio term (the ORPO paper's lambda; TRL's `beta`).
            nll_scope: completion (the chosen reply's tokens, LLaMA-Factory) or prompt_and_completion (prompt and
                reply, TRL and the original repository).
        """
        super().__init__(**kwargs)
        check_choice("nll_scope", nll_scope, choices(ORPONLLScope))
        if beta < 0:
            raise ConfigError(f"beta must be >= 0, got {beta}")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is not None and hasattr(data, "sft_scope"):
            data.sft_scope = self.hparams.nll_scope  # the step's token counts are the NLL's tokens

    def nll_labels(self, batch: dict) -> torch.Tensor:
        """The chosen rows' labels of the tokens the NLL trains (`nll_scope`)."""
        if self.hparams.nll_scope == "prompt_and_completion":
            return with_prompt_labels(batch["chosen_input_ids"], batch["chosen_labels"])
        return batch["chosen_labels"]

    def compute_loss(self, batch: dict):
        hp = self.hparams
        both = concat_pairs(batch)
        nll_labels = self.nll_labels(batch)
        pairs = len(nll_labels)
        # one forward: the chosen rows scored wherever the NLL trains (a superset of the reply), rejected on the reply
        logps = self.target_logps(both["input_ids"], torch.cat([nll_labels, batch["rejected_labels"]]), both["position_ids"])
        mean_c, mean_r = sequence_logps(logps, both["labels"], "mean").chunk(2)
        log_odds = orpo_log_odds(mean_c, mean_r)
        ratio = F.logsigmoid(log_odds)
        step_tokens, step_pairs = self.step_counts(batch, int(target_mask(nll_labels).sum()), pairs)
        nll = reduce_token_loss(
            -logps[:pairs], nll_labels, normalize=hp.normalize,
            num_step_tokens=step_tokens, num_step_sequences=step_pairs, grad_scale=self.grad_scale,
        )
        loss = nll - hp.beta * reduce_pair_loss(ratio, step_pairs, self.grad_scale)
        with torch.no_grad():
            local_nll = reduce_token_loss(-logps[:pairs], nll_labels, normalize=hp.normalize)
            rew_c, rew_r = hp.beta * mean_c, hp.beta * mean_r
            stats = {
                # this micro-batch's share of the step's objective, as a mean over its pairs: train/step_loss
                # (the pair-weighted mean over the step) is then the step's objective, however it is split
                "loss": loss.detach() / self.grad_scale * step_pairs.to(loss.dtype) / pairs,
                "nll_loss": local_nll.detach(),
                "log_odds_ratio": ratio.mean(),
                "log_odds_chosen": log_odds.mean(),
                "rewards/chosen": rew_c.mean(),
                "rewards/rejected": rew_r.mean(),
                "rewards/accuracies": (rew_c > rew_r).float().mean(),
                "rewards/margins": (rew_c - rew_r).mean(),
                "logps/chosen": mean_c.mean(),
                "logps/rejected": mean_r.mean(),
            }
        return loss, {k: v.detach() for k, v in stats.items()}, pairs
