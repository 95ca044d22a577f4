"""GRPOModule: online RL from prompts, with TRL 1.16's GRPO loss options meaning what TRL means.

Design choices:
- Online: completions are sampled at the start of each optimiser step, by the policy being trained
  (`rollout.sample_completions`, the one call site of the generator; stop at the template's
  end-of-turn token, `max_completion_length`, `temperature`). The end-of-turn token of a
  completion that stopped is part of it and is trained (the policy learns to stop), as TRL's
  completion mask includes the EOS token. Log-probs (policy, old policy, reference) are those of
  the tempered distribution the completions were sampled from, softmax(logits / temperature), as
  TRL computes them.
- The recipe, top to bottom: `on_step_start` (StageModule's hook at the first micro-batch of
  every optimiser step) calls `rollout`: sample groups, score them (`rewards.py`), group
  advantages (`loss.py`), old/reference log-probs, the step's counts (`rollout.py` holds the
  pieces). `compute_loss` then trains one micro-batch of it (`micro_batch_loss`: `loss.py`'s
  token losses and aggregation). Validation fills `validation_stats`. No step is overridden.
- One generation per optimiser step: the data hands every micro-batch the prompts of its whole
  step (`data.prompts.GenerationStepLoader`), and the first micro-batch generates, scores and
  prepares the whole step (advantages, old/reference log-probs, the step's completion-token and
  completion counts summed over ranks) before the step's first backward. Later micro-batches
  train on their slice. So `loss_aggregation: dapo` divides by the exact completion tokens of
  the whole step across accumulation and ranks, just as `normalize: token` does, while
  accumulation, gradient clipping and DDP/FSDP gradient sync stay Lightning's (automatic
  optimisation: `accumulate_grad_batches`, `gradient_clip_val` work as in every stage). This is
  TRL's own structure (one generation batch split over the accumulation steps).
- Advantages are group-relative (`loss.group_advantages`, `scale_rewards`); groups are the
  `group_size` completions of one prompt and never straddle micro-batches or ranks (each rank
  generates for its own prompts). `scale_rewards: batch` takes the std over every rank's rewards.
- `num_iterations` > 1 reuses one generation batch for that many optimiser steps (TRL's mu);
  old-policy log-probs are computed once per generation batch, before any update. The batch in
  use is saved in every checkpoint, so a resume inside it continues on the same completions. With
  `num_iterations: 1` the ratio is exactly 1 (pi_old is pi detached, as TRL does).
- The frozen reference (`beta > 0`, k3 KL per token) is DPO's (`stages/reference.py`: a copy of
  the initial policy outside state_dict, or under LoRA the policy with its adapters off);
  `beta: 0` never builds it. `use_bias_correction_kl` multiplies
  the KL by the importance ratio (TRL's option of that name; TRL 1.16's default is True, this
  project's stays False so existing configs keep their meaning: set it for TRL's behaviour).
- `loss_aggregation` takes every `loss_type` TRL 1.16 accepts (dapo, dr_grpo, grpo, bnpo, cispo,
  sapo, luspo, vespo) with TRL's loss and gradient; `delta` is TRL's two-sided clip. Which
  normaliser each uses and whether it is split-invariant: `loss.py`'s docstring.
- Rewards: a None, NaN or infinite reward is an error naming the function, completion, prompt and
  value (`reward_errors: raise`), or the completion is unscorable (`exclude`): out of its group's
  mean and std and of the loss, counted in `train/unscorable`. Prompts cut on the left to
  `max_prompt_len` are counted per step in `train/prompts_left_truncated`.
- `filter_zero_advantage` drops groups whose rewards are all equal (DAPO's dynamic sampling;
  their advantage, and with `beta: 0` their gradient, is zero anyway) before counting, so the
  normalisation covers only trained completions. `mask_truncated_completions` (DAPO) removes
  completions that never stopped from the loss and the counts, keeping them in their group's
  advantage. A micro-batch left without rows still runs one forward on a masked row, so every
  rank runs the same forwards (DDP, FSDP) and the loss is a zero in the graph, never NaN.
- What backward sees is TRL's micro-batch loss (`loss.aggregate_grpo_loss`) times
  `accumulate_grad_batches`, undoing Lightning's division; DDP's mean over ranks is part of
  TRL's semantics (its dapo/dr_grpo divisors carry the number of ranks).
- `train/step_loss` (`STEP_LOSS = "sum"`) is the objective whose gradient the step takes: the sum
  of the step's micro-batch losses, averaged over ranks (as DDP averages gradients); with `train/grad_norm`
  (before clipping) it is what the invariance suite compares across batch splits and ranks.
- Under DDP/FSDP every rank generates for its own prompts, with `fixed_steps` when there is
  more than one rank (FSDP gathers weights in every forward, so ranks run the same number).
  Rollouts are seeded per (rollout_seed, step, prompt index), so a prompt gets the same
  completions whichever rank generates it.
- Validation asks the held-out prompts greedily (`evaluation.evaluate_replies`): exact match
  and stop rate, plus tables of validation replies and of the last step's sampled completions
  (with their rewards) when the logger takes text (W&B).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from llmstages.errors import ConfigError
from llmstages.evaluation import evaluate_replies, log_reply_samples
from llmstages.losses import target_mask, token_logps
from llmstages.options import ImportanceSampling, LossAggregation, RewardErrors, ScaleRewards, check_choice, choices
from llmstages.stages.base import Weighted
from llmstages.stages.grpo.loss import (
    CLIPPED,
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_AGGREGATIONS,
    SCALE_REWARDS,
    aggregate_grpo_loss,
    group_advantages,
    grpo_token_losses,
)
from llmstages.stages.grpo.rewards import Rewards
from llmstages.stages.grpo.rollout import (
    MicroBatch,
    Rollout,
    completion_micro_batch,
    rollout_stats,
    sample_groups,
    scored_ids,
    truncation_masked_rows,
)
from llmstages.stages.reference import ReferenceStage

__all__ = ["GRPOModule"]

ROLLOUT_KEY = "grpo_rollout"  # checkpoint entry: the generation batch in use (num_iterations > 1)


def check_options(hp) -> None:
    """GRPOModule's options, each rejected by name (before any data or model work)."""
    if hp.normalize != "token":
        raise ConfigError("GRPO normalises by loss_aggregation (dapo, dr_grpo, grpo, bnpo); leave normalize at 'token'")
    check_choice("loss_aggregation", hp.loss_aggregation, LOSS_AGGREGATIONS)
    check_choice("scale_rewards", hp.scale_rewards, SCALE_REWARDS)
    check_choice("importance_sampling_level", hp.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    if hp.group_size < 2:
        raise ConfigError(f"group_size must be >= 2 (advantages are relative to the group), got {hp.group_size}")
    if hp.max_completion_length < 1 or hp.num_iterations < 1:
        raise ConfigError(
            f"max_completion_length and num_iterations must be >= 1, got {hp.max_completion_length}, {hp.num_iterations}"
        )
    if hp.temperature <= 0:
        raise ConfigError(f"temperature must be > 0 for rollouts (greedy groups are identical), got {hp.temperature}")
    if hp.beta < 0:
        raise ConfigError(f"beta must be >= 0, got {hp.beta}")
    if hp.use_bias_correction_kl and hp.beta == 0:
        raise ConfigError("use_bias_correction_kl corrects the KL term; it needs beta > 0")
    if hp.delta is not None and hp.delta <= 1:
        raise ConfigError(f"delta clamps the ratio from above and must be > 1 (TRL recommends > 1 + epsilon), got {hp.delta}")
    if hp.delta is not None and hp.loss_aggregation not in CLIPPED:
        raise ConfigError(f"delta is the clipped objective's two-sided clip; loss_aggregation {hp.loss_aggregation!r} has none")
    if min(hp.sapo_temperature_pos, hp.sapo_temperature_neg) <= 0:
        raise ConfigError("sapo_temperature_pos and sapo_temperature_neg must be > 0")
    if hp.loss_aggregation == "vespo" and hp.importance_sampling_level != "token":
        raise ConfigError("vespo weights the summed token log-ratios itself; leave importance_sampling_level at 'token'")
    check_choice("reward_errors", hp.reward_errors, choices(RewardErrors))
    Rewards.check_spec(hp.reward, hp.reward_weights, hp.reward_model)


class GRPOModule(ReferenceStage):
    METRICS = ("exact_match", "stop_rate")
    PROGRESS_BAR = ("reward",)
    STEP_LOSS = "sum"  # each micro-batch's loss is TRL's, already normalised for the whole step

    def __init__(
        self,
        group_size: int = 8,
        max_completion_length: int = 24,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        loss_aggregation: LossAggregation = "dapo",
        scale_rewards: ScaleRewards = "group",
        importance_sampling_level: ImportanceSampling = "token",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        use_bias_correction_kl: bool = False,
        delta: float | None = None,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        num_iterations: int = 1,
        reward: str | list[str] = "exact_match",
        reward_weights: list[float] | None = None,
        reward_model: str | None = None,
        reward_errors: RewardErrors = "raise",
        mask_truncated_completions: bool = False,
        filter_zero_advantage: bool = False,
        rollout_seed: int = 0,
        eval_max_new_tokens: int | None = None,
        log_samples: int = 8,
        **kwargs,
    ) -> None:
        """
        Args:
            group_size: completions sampled per prompt (G); advantages are relative to the group.
            max_completion_length: generation budget per completion (tokens, end-of-turn included); also dr_grpo's constant.
            temperature: sampling temperature for rollouts (> 0; validation is greedy).
            top_k: sample rollouts from the k most likely tokens only (null: all).
            top_p: sample rollouts from the smallest set of tokens with this much probability (null: all).
                As in TRL, the log-probs the loss uses are those of softmax(logits / temperature).
            loss_aggregation: TRL's loss_type. dapo (sum / completion tokens of the whole optimiser step, all micro-batches
                and ranks), dr_grpo (sum / (completions x max_completion_length)), grpo (mean per completion, then per
                micro-batch, / accumulation steps), bnpo (sum / the micro-batch's completion tokens / accumulation steps);
                cispo (clipped detached IS weight x log-prob, dapo's normaliser), sapo (sigmoid-gated ratio, grpo's
                normaliser), luspo (clipped, each completion's sum, mean per micro-batch), vespo (Gamma-weighted
                log-prob, dapo's normaliser).
            scale_rewards: group (divide by the group's std + 1e-4), batch (the whole generation batch's std), none (Dr. GRPO).
            importance_sampling_level: token, or sequence (one ratio per completion from its mean log-ratio: GSPO).
            epsilon: lower clip range of the ratio (1 - epsilon).
            epsilon_high: upper clip range (1 + epsilon_high; DAPO's clip-higher); None: epsilon. With cispo: the absolute
                cap of the IS weight (ScaleRL recommends 5.0).
            beta: weight of the k3 KL to the frozen initial policy; 0 builds no reference.
            use_bias_correction_kl: multiply the KL term by the importance ratio (TRL's option; TRL 1.16 defaults to True).
            delta: two-sided clip: the unclipped ratio is clamped to at most delta (INTELLECT-2; > 1 + epsilon_high); null: off.
            sapo_temperature_pos: sapo's gate temperature where the advantage is positive.
            sapo_temperature_neg: sapo's gate temperature elsewhere.
            vespo_k_pos: vespo's power k for advantages >= 0.
            vespo_lambda_pos: vespo's decay lambda for advantages >= 0.
            vespo_k_neg: vespo's power k for negative advantages.
            vespo_lambda_neg: vespo's decay lambda for negative advantages.
            num_iterations: optimiser steps per generation batch (TRL's mu); 1 keeps the ratio exactly 1.
            reward: exact_match, stopped, length, model, or package.module:function; or a list of them.
            reward_weights: one weight per reward (default 1 each); the reward is their weighted sum.
            reward_model: a trained RewardModule checkpoint, for `reward: model`.
            reward_errors: raise (a None, NaN or infinite reward stops the run, naming function, prompt and value) or
                exclude (that completion is unscorable: out of its group's statistics and the loss, counted).
            mask_truncated_completions: completions that never stopped carry no loss (DAPO).
            filter_zero_advantage: drop groups whose rewards are all equal before the update (DAPO's dynamic sampling).
            rollout_seed: seeds sampling per (step, prompt), whatever rank generates the prompt.
            eval_max_new_tokens: greedy budget for validation replies; None: max_completion_length.
            log_samples: validation samples sent to the logger as a table (when it takes text).
        """
        super().__init__(**kwargs)
        check_options(self.hparams)
        self._rewards: Rewards | None = None
        self._rollout: Rollout | None = None
        self._data = None
        self._step_started = 0.0

    # ----------------------------------------------------------------- set-up

    def needs_reference(self) -> bool:
        return self.hparams.beta > 0

    def setup(self, stage: str) -> None:
        super().setup(stage)  # init_from, then the reference
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is not None:
            self.attach(data)

    def attach(self, data) -> None:
        """Take the tokenizer, stop token and padding from the prompt data; build the rewards."""
        hp = self.hparams
        longest = getattr(data, "max_prompt_len", 0) + hp.max_completion_length
        if longest > self.config.max_seq_len:
            raise ConfigError(
                f"max_prompt_len + max_completion_length = {longest} exceeds the model's max_seq_len "
                f"{self.config.max_seq_len}"
            )
        data.num_iterations = hp.num_iterations  # the loader repeats a step's micro-batches that often
        self._data = data
        if self._rewards is None:
            self._rewards = Rewards(hp.reward, hp.reward_weights, hp.reward_model, data.pad_id, self.config.vocab_size,
                                    errors=hp.reward_errors)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.hparams.num_iterations > 1 and self._rollout is not None:
            # a resume may land inside a generation batch: its later updates reuse this rollout
            checkpoint[ROLLOUT_KEY] = dataclasses.asdict(self._rollout)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # the reference from the initial policy, before the weights load
        saved = checkpoint.get(ROLLOUT_KEY)
        self._rollout = None if saved is None else Rollout(
            **{**saved, "micro_batches": [MicroBatch(**m) for m in saved["micro_batches"]]})

    def on_fit_start(self) -> None:
        super().on_fit_start()  # the reference to the device
        if self._rollout is not None:  # restored from a checkpoint
            move = lambda t: None if t is None else t.to(self.device)  # noqa: E731
            for part in self._rollout.micro_batches:
                part.rows = {k: v.to(self.device) for k, v in part.rows.items()}
                part.advantages, part.old_logps, part.ref_logps = map(move, (part.advantages, part.old_logps, part.ref_logps))
        if self._rewards is not None:
            self._rewards.to(self.device)

    @property
    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    # ----------------------------------------------------------------- the step

    def starts_step(self, batch: dict, batch_idx: int) -> bool:
        return batch["micro_index"] == 0

    def on_step_start(self, batch: dict) -> None:
        self._step_started = time.perf_counter()
        if self._rollout is None or batch["iteration"] == 0:  # later iterations reuse the generation batch
            with self.trainer.precision_plugin.train_step_context():  # as if inside the training step
                self._rollout = self.rollout(batch["step_prompts"])
            self._log_rollout(self._rollout)

    def compute_loss(self, batch: dict):
        if self._rollout is None:  # called outside a Trainer: no step start has generated yet
            self._rollout = self.rollout(batch["step_prompts"])
        loss, stats = self.micro_batch_loss(self._rollout, batch["micro_index"])
        if self._trainer is not None:
            loss = loss * self.trainer.accumulate_grad_batches  # Lightning divides by it; TRL's value is the target
        return loss, stats, self._rollout.micro_batches[batch["micro_index"]].num_completions

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if batch["micro_index"] == len(batch["step_prompts"]) - 1 and self._rollout is not None:
            total = time.perf_counter() - self._step_started
            generation = self._rollout.stats["generation_seconds"] if batch["iteration"] == 0 else 0.0
            self.log("perf/training_seconds", total - generation, batch_size=1)

    # ----------------------------------------------------------------- rollout

    def _generator(self, index: int) -> torch.Generator:
        seed = ((self.hparams.rollout_seed * 1_000_003 + self.global_step) * 1_000_033 + int(index)) % (2**63)
        return torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def rollout(self, step_prompts: Sequence[dict]) -> Rollout:
        """Generate, score and prepare every micro-batch of one optimiser step (this rank's prompts)."""
        if self._data is None:
            raise RuntimeError("GRPOModule has no prompt data: run it in a Trainer with PromptData, or call attach(data)")
        hp, data = self.hparams, self._data
        sampled = sample_groups(
            self.backbone, step_prompts, hp.group_size, self._generator, max_new_tokens=hp.max_completion_length,
            stop_id=data.stop_token_id, temperature=hp.temperature, fixed_steps=self._world_size > 1,
            top_k=hp.top_k, top_p=hp.top_p,
        )
        completions = sampled.completions(data.tokenizer, hp.max_completion_length, data.stop_token_id, hp.group_size)
        rewards, per_function = self._rewards(completions)
        advantages, zero_std = self._advantages(rewards)
        scorable = ~rewards.isnan()  # reward_errors: exclude leaves unscorable completions out of the loss
        keep_group = ~zero_std if hp.filter_zero_advantage else torch.ones_like(zero_std)
        keep_completion = keep_group.repeat_interleave(hp.group_size) & scorable
        scored = scored_ids(sampled, data.stop_token_id)
        micro_batches, start = [], 0
        for micro in step_prompts:
            end = start + len(micro["prompt_ids"]) * hp.group_size
            keep = keep_completion[start:end]
            micro_batches.append(self._micro_batch(
                sampled.prompt_ids[start:end], scored[start:end], sampled.stopped[start:end], advantages[start:end], keep
            ))
            start = end
        step_tokens, step_completions = self._step_counts(micro_batches)
        stats = rollout_stats(rewards, per_function, self._rewards.names, hp.group_size, scored, sampled.stopped,
                              zero_std, sampled.seconds)
        stats["prompts_left_truncated"] = float(sum(sum(m.get("truncated", [])) for m in step_prompts))
        samples = [
            {"prompt": completions.prompts[i], "completion": completions.completions[i], "reward": float(rewards[i]),
             "stopped": sampled.stopped[i]}
            for i in range(min(len(scored), hp.log_samples))
        ]
        return Rollout(micro_batches, step_tokens, step_completions, stats, samples)

    def _advantages(self, rewards: Tensor) -> tuple[Tensor, Tensor]:
        """Group-relative advantages; `scale_rewards: batch` takes the std over every rank's rewards."""
        batch_std = None
        if self.hparams.scale_rewards == "batch":
            everything = self._gather(rewards.to(self.device)).reshape(-1).double()
            everything = everything[~everything.isnan()]  # unscorable completions (reward_errors: exclude)
            batch_std = everything.std() if everything.numel() > 1 else everything.new_zeros(())
        return group_advantages(rewards, self.hparams.group_size, self.hparams.scale_rewards, batch_std)

    def _step_counts(self, micro_batches: list[MicroBatch]) -> tuple[int, int]:
        """The step's trained completion tokens and completions, summed over micro-batches and ranks."""
        tokens = sum(int(target_mask(part.rows["labels"]).sum()) for part in micro_batches)
        completions = sum(part.num_completions for part in micro_batches)
        counts = torch.tensor([tokens, completions], dtype=torch.float64, device=self.device)
        if self._world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        return int(counts[0]), int(counts[1])

    def _gather(self, values: Tensor) -> Tensor:
        return self.all_gather(values) if self._world_size > 1 else values

    def _micro_batch(self, prompts, scored, stopped, advantages, keep) -> MicroBatch:
        """Rows of one micro-batch; old/reference log-probs on every row first (equal forwards on every rank)."""
        hp = self.hparams
        rows = truncation_masked_rows(prompts, scored, stopped, self._data.pad_id, hp.mask_truncated_completions)
        rows = {k: v.to(self.device) for k, v in rows.items()}
        old = self._logps(rows, self.backbone) if hp.num_iterations > 1 else None
        ref = None
        if hp.beta > 0:
            with self.frozen_reference.model(self.backbone) as reference:
                ref = self._logps(rows, reference)
        return completion_micro_batch(rows, advantages.to(self.device), keep.to(self.device), old, ref)

    def _logps(self, rows: dict[str, Tensor], model) -> Tensor:
        with self.precision_context():
            return self.policy_logps(rows, model).detach()

    def policy_logps(self, rows: dict[str, Tensor], model=None) -> Tensor:
        """Per-position log-probs of the completion tokens under the sampling distribution, softmax(logits / T).

        As TRL does, the policy, old-policy and reference log-probs are those of the tempered
        distribution the completions were sampled from (dividing the output layer's weight by T
        divides the logits by T).
        """
        model = self.backbone if model is None else model
        temperature, labels = self.hparams.temperature, rows["labels"]
        head = lambda hidden, weight: token_logps(  # noqa: E731
            hidden, weight / temperature if temperature != 1.0 else weight, labels, chunk_size=self.hparams.chunk_size
        )
        return model(rows["input_ids"], position_ids=rows["position_ids"], head=head)

    def _log_rollout(self, rollout: Rollout) -> None:
        reduce = {"completion_length_min": "min", "completion_length_max": "max", "unscorable": "sum",
                  "prompts_left_truncated": "sum"}
        for name, value in rollout.stats.items():
            prefix = "perf" if name.endswith("seconds") else "train"
            self.log(
                f"{prefix}/{name}", float(value), prog_bar=name in self.PROGRESS_BAR, batch_size=1,
                sync_dist=self._world_size > 1, reduce_fx=reduce.get(name, "mean"),
            )

    # ----------------------------------------------------------------- loss

    def micro_batch_loss(self, rollout: Rollout, index: int, accumulation_steps: int | None = None):
        """(TRL's loss of micro-batch `index` of the rollout, detached stats)."""
        hp = self.hparams
        part = rollout.micro_batches[index]
        mask = target_mask(part.rows["labels"])
        logps = self.policy_logps(part.rows)
        token_losses, stats = grpo_token_losses(
            logps, part.old_logps, part.advantages.to(logps.dtype), mask,
            epsilon=hp.epsilon, epsilon_high=hp.epsilon_high, importance_sampling_level=hp.importance_sampling_level,
            beta=hp.beta, ref_logps=part.ref_logps, use_bias_correction_kl=hp.use_bias_correction_kl,
            loss_type=hp.loss_aggregation, delta=hp.delta,
            sapo_temperature_pos=hp.sapo_temperature_pos, sapo_temperature_neg=hp.sapo_temperature_neg,
            vespo={"k_pos": hp.vespo_k_pos, "lambda_pos": hp.vespo_lambda_pos, "k_neg": hp.vespo_k_neg,
                   "lambda_neg": hp.vespo_lambda_neg},
        )
        loss = aggregate_grpo_loss(
            token_losses, mask, hp.loss_aggregation,
            num_step_tokens=rollout.step_tokens, num_step_completions=rollout.step_completions,
            max_completion_length=hp.max_completion_length,
            accumulation_steps=accumulation_steps or len(rollout.micro_batches), num_processes=self._world_size,
        )
        stats["loss"] = loss.detach()
        return loss, stats

    # ----------------------------------------------------------------- validation

    def validation_stats(self, batch: dict, batch_idx: int):
        """Greedy replies to the held-out prompts: exact match (prompts with an answer) and stop rate."""
        data = self._data
        if data is None:
            return {}, 0
        # every prompt is generated (equal forwards on every rank); only those with an answer are scored
        references = [a if a is not None else "" for a in batch["answers"]]
        budget = self.hparams.eval_max_new_tokens or self.hparams.max_completion_length
        quality = evaluate_replies(
            self.backbone, batch["prompt_ids"], references, data.stop_token_id, data.tokenizer, budget,
            fixed_steps=self._world_size > 1,
        )
        samples = quality["samples"]
        if batch_idx == 0:
            self._val_samples = samples[: self.hparams.log_samples]
        stats = {}
        scored = [(s, a) for s, a in zip(samples, batch["answers"]) if a is not None]
        if scored:
            exact = sum(s["exact_match"] for s, _ in scored) / len(scored)
            stats["exact_match"] = Weighted(torch.tensor(exact, device=self.device), len(scored))
        stopped = sum(s["stopped"] for s in samples) / len(samples)
        stats["stop_rate"] = Weighted(torch.tensor(stopped, device=self.device), len(samples))
        return stats, len(samples)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        samples = getattr(self, "_val_samples", [])
        if self._trainer is None or self.trainer.sanity_checking or not samples:
            return
        log_reply_samples(self, samples, tag="grpo sample")
        logger = self.logger
        if self.trainer.is_global_zero and logger is not None and hasattr(logger, "log_text"):
            if self._rollout is not None and self._rollout.samples:  # what the policy sampled in its last step
                columns = ["prompt", "completion", "reward", "stopped"]
                rows = [[s[c] for c in columns] for s in self._rollout.samples]
                logger.log_text(key="train/samples", columns=columns, data=rows)
