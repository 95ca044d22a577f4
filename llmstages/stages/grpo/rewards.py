"""Rewards for online RL: checkers, user functions, a trained reward model, weighted together.

Design choices:
- A reward function is called with keyword arguments, TRL-style, and returns one float per
  completion. A None, NaN or infinite value is never silently scored 0 (TRL sums the other
  functions' values, so `train/reward` and `train/rewards/<function>` disagree without a word):
  `reward_errors: raise` (the default) stops with an error naming the function, the completion,
  its prompt's index in the step and the value; `reward_errors: exclude` marks that completion
  unscorable (its total reward is NaN): it is left out of its group's mean and std and of the
  loss, and counted (`train/unscorable`). The function is called with `prompts` and `completions` (decoded text, special tokens skipped),
  `completion_ids` (without the end-of-turn token), `stopped` (ended with the end-of-turn
  token), `answer` and `task` (the prompt data's reference, None where absent) and
  `max_completion_length`. User functions take `**kwargs` for what they do not use.
- Names in `reward` (one name or a list, weighted by `reward_weights`, default 1 each):
  `exact_match` (the synthetic tasks' checker: stopped and equal to the answer after stripping
  whitespace; a prompt without an answer is an error), `stopped` (1 when the completion ended
  with the end-of-turn token: the format reward), `length` (-len / max_completion_length: with a
  positive weight, the length penalty), `model` (a trained `RewardModule` checkpoint,
  `reward_model`), or an import path `package.module:function`.
- The reward model is read exactly as RM validation reads it: at the last labelled token of
  `prompt + completion` (the end-of-turn token when the completion stopped). It is frozen, in
  eval mode, outside the policy's state_dict and optimiser, loaded by `model.checkpoint.load_model`
  (the one loader of trained models; rewards never import a stage).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llmstages.errors import ConfigError
from llmstages.data.prompts import completion_rows
from llmstages.data.answers import exact_match as is_exact_match
from llmstages.model.checkpoint import load_model
from llmstages.options import RewardErrors, check_choice, choices

__all__ = ["Completions", "exact_match", "stopped", "length", "load_function", "RewardModelScore", "Rewards", "BUILTIN"]


@dataclass
class Completions:
    """What a reward function is asked about: `N` completions, group after group."""

    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    stopped: list[bool]
    answer: list[str | None]
    task: list[str | None]
    prompt_ids: list[list[int]]
    max_completion_length: int
    stop_id: int
    group_size: int = 1  # completions per prompt: completion i answers the step's prompt i // group_size

    def kwargs(self) -> dict:
        return {
            "prompts": self.prompts, "completions": self.completions, "completion_ids": self.completion_ids,
            "stopped": self.stopped, "answer": self.answer, "task": self.task,
            "max_completion_length": self.max_completion_length,
        }


def exact_match(completions: list[str], answer: list[str | None], stopped: list[bool], **_) -> list[float]:
    """1.0 when the completion stopped and equals the reference answer (`data.answers.exact_match`)."""
    missing = [i for i, a in enumerate(answer) if a is None]
    if missing:
        raise ValueError(
            f"reward exact_match needs a reference answer for every prompt; completion {missing[0]} has none "
            "(give `answer` in the prompt records, or use another reward)"
        )
    return [float(is_exact_match(c, a, s)) for c, a, s in zip(completions, answer, stopped)]


def stopped(stopped: list[bool], **_) -> list[float]:
    """1.0 when the completion ended with the end-of-turn token (a format reward)."""
    return [float(s) for s in stopped]


def length(completion_ids: list[list[int]], max_completion_length: int, **_) -> list[float]:
    """-len / max_completion_length: 0 for an empty completion, -1 for one that used the whole budget."""
    return [-len(ids) / max_completion_length for ids in completion_ids]


BUILTIN: dict[str, Callable[..., list]] = {"exact_match": exact_match, "stopped": stopped, "length": length}


def load_function(spec: str) -> Callable[..., list]:
    """`package.module:function` -> the function (an error names the part that is missing)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"reward {spec!r}: expected one of {sorted(BUILTIN) + ['model']} or an import path 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward {spec!r}: cannot import module {module_name!r} ({error})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"reward {spec!r}: module {module_name!r} has no function {attribute!r}")
    return function


class RewardModelScore:
    """A trained `RewardModule` checkpoint as a reward function (frozen, read at the last labelled token)."""

    def __init__(self, checkpoint: str, pad_id: int, vocab_size: int | None = None, batch_size: int = 32) -> None:
        self.model = load_model(checkpoint)
        if not self.model.is_reward_model:
            raise ConfigError(f"reward_model {checkpoint}: has no value_head.weight, not a trained reward model")
        self.model.model.requires_grad_(False)
        if vocab_size is not None and self.model.model.config.vocab_size != vocab_size:
            raise ConfigError(
                f"reward_model {checkpoint}: vocabulary of {self.model.model.config.vocab_size} tokens, the policy's has "
                f"{vocab_size}; a reward model must share the policy's tokenizer"
            )
        self.pad_id, self.batch_size = pad_id, batch_size

    def to(self, device) -> RewardModelScore:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: Completions) -> list[float]:
        device = next(self.model.model.parameters()).device
        scored = [ids + [batch.stop_id] if s else ids for ids, s in zip(batch.completion_ids, batch.stopped)]
        out: list[float] = []
        for start in range(0, len(scored), self.batch_size):
            end = start + self.batch_size
            rows = completion_rows(batch.prompt_ids[start:end], scored[start:end], self.pad_id)
            rows = {k: v.to(device) for k, v in rows.items()}
            out += self.model.rewards(rows["input_ids"], rows["labels"], rows["position_ids"]).float().tolist()
        return out


class Rewards:
    """Several reward functions, weighted and summed (TRL: `reward_funcs` + `reward_weights`)."""

    def __init__(
        self,
        reward: str | Sequence[str] = "exact_match",
        weights: Sequence[float] | None = None,
        reward_model: str | None = None,
        pad_id: int = 0,
        vocab_size: int | None = None,
        errors: RewardErrors = "raise",
    ) -> None:
        self.names, self.weights = self.check_spec(reward, weights, reward_model)
        self.errors = check_choice("reward_errors", errors, choices(RewardErrors))
        self.functions: list[Callable] = []
        self.model: RewardModelScore | None = None
        for name in self.names:
            if name == "model":
                self.model = RewardModelScore(reward_model, pad_id, vocab_size)
                self.functions.append(self.model)
            elif name in BUILTIN:
                self.functions.append(BUILTIN[name])
            else:
                self.functions.append(load_function(name))

    @staticmethod
    def check_spec(
        reward: str | Sequence[str], weights: Sequence[float] | None = None, reward_model: str | None = None
    ) -> tuple[list[str], list[float]]:
        """(names, weights) after checking them without importing or loading anything."""
        names = [reward] if isinstance(reward, str) else list(reward)
        if not names:
            raise ValueError("reward: give at least one reward function")
        if len(set(names)) != len(names):
            raise ValueError(f"reward: {names} names a function twice")
        for name in names:
            if name != "model" and name not in BUILTIN and ":" not in name:
                raise ValueError(
                    f"reward {name!r}: expected one of {sorted(BUILTIN) + ['model']} or an import path "
                    "'package.module:function'"
                )
        weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        if len(weights) != len(names):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(names)} reward functions {names}")
        if "model" in names and reward_model is None:
            raise ValueError("reward 'model' needs reward_model: the path of a trained RewardModule checkpoint")
        if reward_model is not None and "model" not in names:
            raise ValueError("reward_model is set but 'model' is not among the rewards; add it to `reward`")
        return names, weights

    def to(self, device) -> Rewards:
        if self.model is not None:
            self.model.to(device)
        return self

    def __call__(self, batch: Completions) -> tuple[Tensor, Tensor]:
        """(weighted sum `[N]`, each function's values `[N, F]`).

        A None, NaN or infinite value raises (`errors: raise`) or makes its completion unscorable
        (`exclude`): NaN in its function's column and in the sum.
        """
        n = len(batch.completions)
        columns = []
        for name, function in zip(self.names, self.functions):
            values = function(batch) if function is self.model else function(**batch.kwargs())
            values = list(values)
            if len(values) != n:
                raise ValueError(f"reward {name!r} returned {len(values)} values for {n} completions")
            column = [self._checked(name, i, v, batch.group_size) for i, v in enumerate(values)]
            columns.append(column)
        per_function = torch.tensor(columns, dtype=torch.float64).T.reshape(n, len(self.names))
        weights = torch.tensor(self.weights, dtype=torch.float64)
        return (per_function * weights).sum(dim=1), per_function  # NaN where any function could not score

    def _checked(self, name: str, index: int, value, group_size: int) -> float:
        """`value` as a float; a None, NaN or inf is an error naming the function, completion, prompt and value, or NaN."""
        number = math.nan if value is None else float(value)
        if math.isfinite(number):
            return number
        if self.errors == "raise":
            raise ValueError(
                f"reward {name!r} returned {value!r} for completion {index} (prompt {index // group_size} of this step); "
                "reward functions must return a finite number for every completion, or set "
                "model.init_args.reward_errors: exclude to leave such completions out of their group and the loss"
            )
        return math.nan
