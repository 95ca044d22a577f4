"""GRPOModule: online RL from prompts, with TRL 1.16's GRPO loss options meaning what TRL means.

Design choices:
- Online: completions are sampled inside the training step, by the policy being trained
  (`sample_completions`, the one call site of the generator; stop at the template's
  end-of-turn token, `max_completion_length`, `temperature`). The end-of-turn token of a
  completion that stopped is part of it and is trained (the policy learns to stop), as TRL's
  completion mask includes the EOS token. Log-probs (policy, old policy, reference) are those of
  the tempered distribution the completions were sampled from, softmax(logits / temperature), as
  TRL computes them.
- One generation per optimiser step: the data hands every micro-batch the prompts of its whole
  step (`data.prompts.GenerationStepLoader`), and the first micro-batch generates, scores and
  prepares the whole step (advantages, old/reference log-probs, the step's completion-token and
  completion counts summed over ranks) before the step's first backward. Later micro-batches
  train on their slice. So `loss_aggregation: dapo` divides by the exact completion tokens of
  the whole step across accumulation and ranks, just as `normalize: token` does, while
  accumulation, gradient clipping and DDP/FSDP gradient sync stay Lightning's (automatic
  optimisation: `accumulate_grad_batches`, `gradient_clip_val` work as in every stage). This is
  TRL's own structure (one generation batch split over the accumulation steps).
- Advantages are group-relative (`losses.group_advantages`, `scale_rewards`); groups are the
  `group_size` completions of one prompt and never straddle micro-batches or ranks (each rank
  generates for its own prompts). `scale_rewards: batch` takes the std over every rank's rewards.
- `num_iterations` > 1 reuses one generation batch for that many optimiser steps (TRL's mu);
  old-policy log-probs are computed once per generation batch, before any update. The batch in
  use is saved in every checkpoint, so a resume inside it continues on the same completions. With
  `num_iterations: 1` the ratio is exactly 1 (pi_old is pi detached, as TRL does).
- The frozen reference (`beta > 0`, k3 KL per token) is a copy of the initial policy, held
  outside state_dict like DPO's; `beta: 0` never builds it. `use_bias_correction_kl` multiplies
  the KL by the importance ratio (TRL's option of that name; TRL's default is off).
- `filter_zero_advantage` drops groups whose rewards are all equal (DAPO's dynamic sampling;
  their advantage, and with `beta: 0` their gradient, is zero anyway) before counting, so the
  normalisation covers only trained completions. `mask_truncated_completions` (DAPO) removes
  completions that never stopped from the loss and the counts, keeping them in their group's
  advantage. A micro-batch left without rows still runs one forward on a masked row, so every
  rank runs the same forwards (DDP, FSDP) and the loss is a zero in the graph, never NaN.
- What backward sees is TRL's micro-batch loss (`losses.aggregate_grpo_loss`) times
  `accumulate_grad_batches`, undoing Lightning's division; DDP's mean over ranks is part of
  TRL's semantics (its dapo/dr_grpo divisors carry the number of ranks).
- `train/step_loss` is the objective whose gradient the step takes: the sum of the step's
  micro-batch losses, averaged over ranks (as DDP averages gradients); with `train/grad_norm`
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

import contextlib
import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llmstages.data.prompts import completion_rows
from llmstages.evaluation import evaluate_replies, exact_match, log_reply_samples
from llmstages.losses import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_AGGREGATIONS,
    SCALE_REWARDS,
    aggregate_grpo_loss,
    group_advantages,
    grpo_token_losses,
    target_mask,
    token_logps,
)
from llmstages.model.generate import generate_batch
from llmstages.options import ImportanceSampling, LossAggregation, ScaleRewards, check_choice
from llmstages.rewards import Completions, Rewards
from llmstages.stages.base import LMStage

__all__ = ["GRPOModule", "sample_completions", "Rollout", "MicroBatch"]

ROLLOUT_KEY = "grpo_rollout"  # checkpoint entry: the generation batch in use (num_iterations > 1)


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: list[int],
    group_size: int,
    max_new_tokens: int,
    stop_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    fixed_steps: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
) -> list[tuple[list[int], bool]]:
    """`group_size` sampled continuations of one prompt: (tokens without the stop token, stopped).

    The one place GRPO generates: the group as one batch through the KV cache. One
    generator per prompt keeps a prompt's group the same on whichever rank samples it.
    """
    return generate_batch(
        model, [prompt_ids] * group_size, max_new_tokens, stop_ids=[stop_id], temperature=temperature,
        top_k=top_k, top_p=top_p, generator=generator, fixed_steps=fixed_steps,
    )


@dataclass
class MicroBatch:
    """One micro-batch's completions as rows, with what the loss needs from the rollout."""

    rows: dict[str, Tensor]  # input_ids, labels, position_ids (labels: the scored completion tokens)
    advantages: Tensor  # [B]
    old_logps: Tensor | None  # [B, T] aligned with rows (num_iterations > 1)
    ref_logps: Tensor | None  # [B, T] (beta > 0)
    num_completions: int  # real completions (0 for the placeholder row of an emptied micro-batch)


@dataclass
class Rollout:
    """The generation batch of one optimiser step (this rank's part) and the step's global counts."""

    micro_batches: list[MicroBatch]
    step_tokens: int  # completion tokens carrying a loss, summed over micro-batches and ranks
    step_completions: int  # completions trained on (after filter_zero_advantage), summed over micro-batches and ranks
    stats: dict[str, float]
    samples: list[dict]


class GRPOModule(LMStage):
    METRICS = ("exact_match", "stop_rate")
    PROGRESS_BAR = ("reward",)

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
        num_iterations: int = 1,
        reward: str | list[str] = "exact_match",
        reward_weights: list[float] | None = None,
        reward_model: str | None = None,
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
            loss_aggregation: dapo (sum / completion tokens of the whole optimiser step, all micro-batches and ranks),
                dr_grpo (sum / (completions x max_completion_length)), grpo (mean per completion, then per micro-batch,
                / accumulation steps), bnpo (sum / the micro-batch's completion tokens / accumulation steps).
            scale_rewards: group (divide by the group's std + 1e-4), batch (the whole generation batch's std), none (Dr. GRPO).
            importance_sampling_level: token, or sequence (one ratio per completion from its mean log-ratio: GSPO).
            epsilon: lower clip range of the ratio (1 - epsilon).
            epsilon_high: upper clip range (1 + epsilon_high; DAPO's clip-higher); None: epsilon.
            beta: weight of the k3 KL to the frozen initial policy; 0 builds no reference.
            use_bias_correction_kl: multiply the KL term by the importance ratio (TRL's option; default off, as TRL).
            num_iterations: optimiser steps per generation batch (TRL's mu); 1 keeps the ratio exactly 1.
            reward: exact_match, stopped, length, model, or package.module:function; or a list of them.
            reward_weights: one weight per reward (default 1 each); the reward is their weighted sum.
            reward_model: a trained RewardModule checkpoint, for `reward: model`.
            mask_truncated_completions: completions that never stopped carry no loss (DAPO).
            filter_zero_advantage: drop groups whose rewards are all equal before the update (DAPO's dynamic sampling).
            rollout_seed: seeds sampling per (step, prompt), whatever rank generates the prompt.
            eval_max_new_tokens: greedy budget for validation replies; None: max_completion_length.
            log_samples: validation samples sent to the logger as a table (when it takes text).
        """
        super().__init__(**kwargs)
        if self.hparams.normalize != "token":
            raise ValueError("GRPO normalises by loss_aggregation (dapo, dr_grpo, grpo, bnpo); leave normalize at 'token'")
        check_choice("loss_aggregation", loss_aggregation, LOSS_AGGREGATIONS)
        check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
        check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {group_size}")
        if max_completion_length < 1 or num_iterations < 1:
            raise ValueError(
                f"max_completion_length and num_iterations must be >= 1, got {max_completion_length}, {num_iterations}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for rollouts (greedy groups are identical), got {temperature}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if use_bias_correction_kl and beta == 0:
            raise ValueError("use_bias_correction_kl corrects the KL term; it needs beta > 0")
        Rewards.check_spec(reward, reward_weights, reward_model)
        self._reference = None
        self._rewards: Rewards | None = None
        self._rollout: Rollout | None = None
        self._data = None
        self._step_started = 0.0
        self._step_objective = torch.zeros((), dtype=torch.float64)

    # ----------------------------------------------------------------- set-up

    def setup(self, stage: str) -> None:
        super().setup(stage)  # init_from first: the reference copies the initial policy
        self._copy_reference()
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is not None:
            self.attach(data)

    def attach(self, data) -> None:
        """Take the tokenizer, stop token and padding from the prompt data; build the rewards."""
        hp = self.hparams
        longest = getattr(data, "max_prompt_len", 0) + hp.max_completion_length
        if longest > self.config.max_seq_len:
            raise ValueError(
                f"max_prompt_len + max_completion_length = {longest} exceeds the model's max_seq_len "
                f"{self.config.max_seq_len}"
            )
        data.num_iterations = hp.num_iterations  # the loader repeats a step's micro-batches that often
        self._data = data
        if self._rewards is None:
            self._rewards = Rewards(hp.reward, hp.reward_weights, hp.reward_model, data.pad_id, self.config.vocab_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.hparams.num_iterations > 1 and self._rollout is not None:
            # a resume may land inside a generation batch: its later updates reuse this rollout
            checkpoint[ROLLOUT_KEY] = dataclasses.asdict(self._rollout)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # before the checkpoint's weights load: the backbone still holds the initial policy
        if not self._initialised and self.hparams.init_from is not None:
            super().setup("fit")
        self._copy_reference()
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(ROLLOUT_KEY)
        self._rollout = None if saved is None else Rollout(
            **{**saved, "micro_batches": [MicroBatch(**m) for m in saved["micro_batches"]]})

    def _copy_reference(self) -> None:
        if self.hparams.beta > 0 and self._reference is None:
            reference = copy.deepcopy(self.backbone).eval().requires_grad_(False)
            object.__setattr__(self, "_reference", reference)  # not a submodule: no state_dict, no DDP

    def on_fit_start(self) -> None:
        if self._reference is not None:
            self._reference.to(self.device)
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
        stop_id, tokenizer, group = data.stop_token_id, data.tokenizer, hp.group_size
        started = time.perf_counter()
        prompts, answers, tasks, sampled = [], [], [], []
        for micro in step_prompts:
            for ids, answer, task, index in zip(micro["prompt_ids"], micro["answers"], micro["tasks"], micro["index"].tolist()):
                completions = sample_completions(
                    self.backbone, ids, group, hp.max_completion_length, stop_id, hp.temperature,
                    generator=self._generator(index), fixed_steps=self._world_size > 1, top_k=hp.top_k, top_p=hp.top_p,
                )
                prompts += [ids] * group
                answers += [answer] * group
                tasks += [task] * group
                sampled += completions
        generation_seconds = time.perf_counter() - started

        completion_ids = [tokens for tokens, _ in sampled]
        stopped = [s for _, s in sampled]
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in completion_ids]
        batch = Completions(
            prompts=[tokenizer.decode(p) for p in prompts], completions=texts, completion_ids=completion_ids,
            stopped=stopped, answer=answers, task=tasks, prompt_ids=prompts,
            max_completion_length=hp.max_completion_length, stop_id=stop_id,
        )
        rewards, per_function = self._rewards(batch)
        batch_std = None
        if hp.scale_rewards == "batch":
            everything = self._gather(rewards.to(self.device)).reshape(-1).double()
            batch_std = everything.std() if everything.numel() > 1 else everything.new_zeros(())
        advantages, zero_std = group_advantages(rewards, group, hp.scale_rewards, batch_std)
        keep_group = ~zero_std if hp.filter_zero_advantage else torch.ones_like(zero_std)

        scored = [ids + [stop_id] if s else ids for ids, s in zip(completion_ids, stopped)]
        micro_batches, start = [], 0
        local_tokens = local_completions = 0
        for micro in step_prompts:
            end = start + len(micro["prompt_ids"]) * group
            part = self._micro_batch(
                prompts[start:end], scored[start:end], stopped[start:end], advantages[start:end],
                keep_group[start // group : end // group].repeat_interleave(group),
            )
            local_tokens += int(target_mask(part.rows["labels"]).sum())
            local_completions += part.num_completions
            micro_batches.append(part)
            start = end
        counts = torch.tensor([local_tokens, local_completions], dtype=torch.float64, device=self.device)
        if self._world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")

        lengths = torch.tensor([len(s) for s in scored], dtype=torch.float64)
        stats = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.view(-1, group).std(dim=1).mean()),
            "completion_length": float(lengths.mean()),
            "completion_length_min": float(lengths.min()),
            "completion_length_max": float(lengths.max()),
            "stop_rate": float(torch.tensor(stopped, dtype=torch.float64).mean()),
            "zero_advantage_fraction": float(zero_std.double().mean()),
            "generation_seconds": generation_seconds,
        }
        for name, column in zip(self._rewards.names, per_function.T):
            finite = column[~column.isnan()]
            stats[f"rewards/{_metric_name(name)}"] = float(finite.mean()) if finite.numel() else float("nan")
        samples = [
            {"prompt": batch.prompts[i], "completion": texts[i], "reward": float(rewards[i]), "stopped": stopped[i]}
            for i in range(min(len(texts), self.hparams.log_samples))
        ]
        return Rollout(micro_batches, int(counts[0]), int(counts[1]), stats, samples)

    def _gather(self, values: Tensor) -> Tensor:
        return self.all_gather(values) if self._world_size > 1 else values

    def _micro_batch(self, prompts, scored, stopped, advantages, keep) -> MicroBatch:
        """Rows of one micro-batch; old/reference log-probs on every row first (equal forwards on every rank)."""
        hp = self.hparams
        rows = completion_rows(prompts, scored, self._data.pad_id)
        if hp.mask_truncated_completions:
            truncated = ~torch.tensor(stopped, dtype=torch.bool)
            rows["labels"][truncated] = -100
        rows = {k: v.to(self.device) for k, v in rows.items()}
        old = self._logps(rows, self.backbone) if hp.num_iterations > 1 else None
        ref = self._logps(rows, self._reference) if hp.beta > 0 else None
        keep = keep.to(self.device)
        if not bool(keep.any()):  # one masked row keeps this micro-batch's forward (and its zero loss)
            keep = torch.zeros_like(keep)
            keep[0] = True
            rows["labels"][0] = -100
            advantages = torch.zeros_like(advantages)
            count = 0
        else:
            count = int(keep.sum())
        select = lambda t: None if t is None else t[keep]  # noqa: E731
        return MicroBatch(
            {k: v[keep] for k, v in rows.items()}, advantages.to(self.device)[keep], select(old), select(ref), count
        )

    def _logps(self, rows: dict[str, Tensor], model) -> Tensor:
        with self._precision_context():
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

    def _precision_context(self):
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()

    # ----------------------------------------------------------------- loss

    def micro_batch_loss(self, rollout: Rollout, index: int, accumulation_steps: int | None = None):
        """(TRL's loss of micro-batch `index` of the rollout, detached stats)."""
        hp = self.hparams
        part = rollout.micro_batches[index]
        labels = part.rows["labels"]
        mask = target_mask(labels)
        logps = self.policy_logps(part.rows)
        token_losses, stats = grpo_token_losses(
            logps, part.old_logps, part.advantages.to(logps.dtype), mask,
            epsilon=hp.epsilon, epsilon_high=hp.epsilon_high, importance_sampling_level=hp.importance_sampling_level,
            beta=hp.beta, ref_logps=part.ref_logps, use_bias_correction_kl=hp.use_bias_correction_kl,
        )
        loss = aggregate_grpo_loss(
            token_losses, mask, hp.loss_aggregation,
            num_step_tokens=rollout.step_tokens, num_step_completions=rollout.step_completions,
            max_completion_length=hp.max_completion_length,
            accumulation_steps=accumulation_steps or len(rollout.micro_batches), num_processes=self._world_size,
        )
        stats["loss"] = loss.detach()
        return loss, stats

    def compute_loss(self, batch: dict):
        if self._rollout is None or (batch["micro_index"] == 0 and batch["iteration"] == 0):
            self._rollout = self.rollout(batch["step_prompts"])
            self._log_rollout(self._rollout)
        loss, stats = self.micro_batch_loss(self._rollout, batch["micro_index"])
        if self._trainer is not None:
            loss = loss * self.trainer.accumulate_grad_batches  # Lightning divides by it; TRL's value is the target
        return loss, stats, self._rollout.micro_batches[batch["micro_index"]].num_completions

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, stats, _ = self.compute_loss(batch)
        self._step_objective += stats["loss"].double()
        for name, value in stats.items():
            self.log(f"train/{name}", value, prog_bar=name in self.PROGRESS_BAR, batch_size=1)
        return loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if batch["micro_index"] == 0:
            self._step_started = time.perf_counter()
            self._step_objective = torch.zeros((), dtype=torch.float64, device=self.device)

    def on_before_optimizer_step(self, optimizer) -> None:
        # the objective the step's gradient is the gradient of: the sum of TRL's micro-batch losses,
        # averaged over ranks as DDP averages their gradients (split-invariant for dapo and dr_grpo)
        objective = self._step_objective
        if self._world_size > 1:
            objective = self.trainer.strategy.reduce(objective, reduce_op="sum") / self._world_size
        self.log("train/step_loss", objective.float(), sync_dist=False)
        super().on_before_optimizer_step(optimizer)  # train/grad_norm

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if batch["micro_index"] == len(batch["step_prompts"]) - 1 and self._rollout is not None:
            total = time.perf_counter() - self._step_started
            generation = self._rollout.stats["generation_seconds"] if batch["iteration"] == 0 else 0.0
            self.log("perf/training_seconds", total - generation, batch_size=1)

    def _log_rollout(self, rollout: Rollout) -> None:
        if self._trainer is None:
            return
        reduce = {"completion_length_min": "min", "completion_length_max": "max"}
        for name, value in rollout.stats.items():
            prefix = "perf" if name.endswith("seconds") else "train"
            self.log(
                f"{prefix}/{name}", float(value), prog_bar=name in self.PROGRESS_BAR, batch_size=1,
                sync_dist=self._world_size > 1, reduce_fx=reduce.get(name, "mean"),
            )

    # ----------------------------------------------------------------- validation

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        data = self._data
        if data is None:
            return
        # every prompt is generated (equal forwards on every rank); only those with an answer are scored
        references = [a if a is not None else "" for a in batch["answers"]]
        budget = self.hparams.eval_max_new_tokens or self.hparams.max_completion_length
        quality = evaluate_replies(
            self.backbone, batch["prompt_ids"], references, data.stop_token_id, data.tokenizer, budget,
            fixed_steps=self._world_size > 1,
        )
        samples = quality["samples"]
        scored = [(s, a) for s, a in zip(samples, batch["answers"]) if a is not None]
        if scored:
            exact = sum(exact_match(s["reply"], a, s["stopped"]) for s, a in scored) / len(scored)
            self.val_means.update("val/exact_match", torch.tensor(exact, device=self.device), len(scored))
        stopped = sum(s["stopped"] for s in samples) / len(samples)
        self.val_means.update("val/stop_rate", torch.tensor(stopped, device=self.device), len(samples))
        if batch_idx == 0:
            self._val_samples = samples[: self.hparams.log_samples]

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


def _metric_name(reward: str) -> str:
    """A logging-safe name for a reward (an import path keeps its function name)."""
    return reward.rpartition(":")[2] if ":" in reward else reward
