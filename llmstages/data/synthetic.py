"""The embedded default data sets: small tasks with checkable answers.

Design choices:
- Every example comes from a `Task` with a canonical short answer, so a
  benchmark can score first-reply-token accuracy, stopping, and exact-match
  correctness (`score_reply`) without a judge model.
- Tasks are tiny and regular (two-number addition, copy / reverse / uppercase
  / count a short word from a fixed list, sort digits, max of a short list,
  the next two letters of the alphabet) so a ~1M-parameter model with a
  1-2k byte-level BPE learns them in minutes on a CPU. Prompts are rendered
  from 2-3 phrasings each; everything is lowercase except uppercase answers.
- Every canonical answer has at least two characters, so a strictly *shorter*
  wrong answer that is still non-empty always exists (that is why counting
  answers "3 letters" and the alphabet task asks for two letters). Wrong
  answers are checked on construction: strictly longer or shorter, as asked,
  and without surrounding whitespace.
- Determinism: each generator owns a `random.Random` seeded with a string
  `"llmstages.synthetic:<purpose>:<seed>"` (string seeds hash through SHA-512,
  independent of PYTHONHASHSEED); the global RNG is never touched. The
  purposes `pretrain`, `sft`, `preference`, `tuning` and `eval` are distinct
  strings, so the evaluation stream of `prompt_answer_pairs` is disjoint from
  every training stream and from the tuning stream of `tuning_pairs` (where
  settings are chosen, e.g. the demo's own-mistakes pairs and GRPO's tasks) by
  construction, for every pair of seeds. Individual
  problems can still coincide (the word list is finite): the streams, not
  the facts, are disjoint.
- Plain data only (strings, lists, dicts) in the messages schema of `data/batch.py` and `docs/design.md`;
  `write_default_data` writes the standard text / jsonl formats so users can
  read and edit what the defaults train on.
"""

from __future__ import annotations

import json
import random
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from llmstages.data.answers import exact_match

__all__ = [
    "SYSTEM_PROMPTS",
    "TASKS",
    "WORDS",
    "Task",
    "pretrain_corpus",
    "preference_pairs",
    "prompt_answer_pairs",
    "score_reply",
    "sft_conversations",
    "tuning_pairs",
    "write_default_data",
]

# Short common words, none of them used in a prompt phrasing, so the word a
# prompt is about is unambiguous.
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "map", "cup", "hat", "pen", "box", "bus", "car",
    "fox", "owl", "bee", "ant", "egg", "jam", "key", "log", "pig", "cow",
    "hen", "bed", "bag", "fan", "gem", "ink", "jar", "mud", "nut", "pot",
    "rug", "sea", "toy", "van", "yak", "zoo", "bird", "fish", "frog", "lamp",
    "milk", "moon", "nest", "rain", "ring", "rock", "rose", "ship", "shoe",
    "snow", "star", "tree", "wolf", "bell", "cake", "door", "duck", "lion",
    "leaf", "kite", "apple", "bread", "chair", "cloud", "grass", "house",
    "horse", "lemon", "mouse", "plant", "river", "sheep", "stone", "table",
    "tiger", "train", "water", "zebra",
)

SYSTEM_PROMPTS: tuple[str, ...] = (
    "you are a helpful assistant.",
    "answer with the answer only.",
    "you are a careful tutor. keep replies short.",
)

_SYSTEM_PROB = 0.25  # share of conversations / prompts that open with a system message
_PREF_MULTI_TURN_PROB = 0.2  # share of preference prompts with earlier exchanges
_FACT_PROB = 0.75  # share of pretraining sentences that are task facts (rest: prose)

# Wrapped around a wrong value to make a verbose wrong reply; every prefix is
# longer than any canonical answer, so the result is always strictly longer.
_VERBOSE = ("i think it is {}", "maybe {}, i am not sure", "my guess is {}")


class Task(ABC):
    """One task: draws a problem, renders it, solves it, and makes wrong replies.

    Subclasses fill `name`, `prompts` and `facts` (format strings over the
    fields returned by `draw`; facts may also use `{answer}`) and implement
    `draw`, `solve` and `_wrong`.
    """

    name: str
    prompts: tuple[str, ...]
    facts: tuple[str, ...]

    @abstractmethod
    def draw(self, rng: random.Random) -> dict[str, str]:
        """Random problem fields, e.g. {"a": "12", "b": "35"}."""

    @abstractmethod
    def solve(self, fields: dict[str, str]) -> str:
        """The canonical answer for the fields."""

    @abstractmethod
    def _wrong(self, rng: random.Random, answer: str, longer: bool) -> str:
        """A wrong reply, strictly longer (or shorter) than `answer`."""

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """A rendered user prompt and its canonical answer."""
        fields = self.draw(rng)
        return rng.choice(self.prompts).format(**fields), self.solve(fields)

    def fact(self, rng: random.Random) -> str:
        """One plain-text sentence stating a solved problem (for pretraining)."""
        fields = self.draw(rng)
        answer = self.solve(fields)
        if rng.random() < 0.3:  # the question form too, so prompts are seen in pretraining
            return f"{rng.choice(self.prompts).format(**fields)} {answer}."
        return rng.choice(self.facts).format(answer=answer, **fields)

    def wrong_answer(self, rng: random.Random, answer: str, *, longer: bool) -> str:
        """A plausible wrong reply to a problem whose right answer is `answer`.

        `longer=True`: strictly more characters than `answer`; `longer=False`:
        strictly fewer (and non-empty). Raises if a construction breaks that.
        """
        wrong = self._wrong(rng, answer, longer)
        ok_len = len(wrong) > len(answer) if longer else 0 < len(wrong) < len(answer)
        if not ok_len or wrong != wrong.strip() or wrong == answer:
            raise RuntimeError(f"{self.name}: bad wrong answer {wrong!r} for {answer!r} (longer={longer})")
        return wrong


def _other_int(rng: random.Random, right: int, digits: int) -> int:
    """A random integer with exactly `digits` digits, different from `right`."""
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    while True:
        value = rng.randrange(lo, 10**digits)
        if value != right:
            return value


def _drop_one(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text))
    return text[:i] + text[i + 1 :]


class _Number(Task):
    """Shared wrong answers for tasks whose answer is an integer of 2+ digits."""

    def _wrong(self, rng: random.Random, answer: str, longer: bool) -> str:
        right, digits = int(answer), len(answer)
        if not longer:
            return str(_other_int(rng, right, digits - 1))
        kind = rng.randrange(3)
        if kind == 0:  # right answer plus an extra digit
            return answer + str(rng.randrange(10))
        if kind == 1:
            return str(_other_int(rng, right, digits + 1))
        return rng.choice(_VERBOSE).format(_other_int(rng, right, digits))


class Add(_Number):
    name = "add"
    prompts = ("what is {a} plus {b}?", "add {a} and {b}.", "{a} + {b} = ?")
    facts = ("{a} plus {b} is {answer}.", "{a} + {b} = {answer}.")

    def draw(self, rng: random.Random) -> dict[str, str]:
        # Operands from 10 so every sum has 2+ digits (a shorter wrong answer exists).
        return {"a": str(rng.randint(10, 99)), "b": str(rng.randint(10, 99))}

    def solve(self, fields: dict[str, str]) -> str:
        return str(int(fields["a"]) + int(fields["b"]))


class Max(_Number):
    name = "max"
    prompts = ("what is the largest of {nums}?", "which is biggest: {nums}?", "max of {nums}.")
    facts = ("the largest of {nums} is {answer}.", "max of {nums} is {answer}.")

    def draw(self, rng: random.Random) -> dict[str, str]:
        nums = rng.sample(range(10, 100), rng.randint(3, 4))
        return {"nums": " ".join(map(str, nums))}

    def solve(self, fields: dict[str, str]) -> str:
        return str(max(int(x) for x in fields["nums"].split()))


class _Word(Task):
    """Tasks about one word from `WORDS`."""

    def draw(self, rng: random.Random) -> dict[str, str]:
        return {"w": rng.choice(WORDS)}


class Copy(_Word):
    name = "copy"
    prompts = ("repeat the word {w}.", "say {w}.", "copy this: {w}")
    facts = ("{w} copied is {answer}.", "say {w}: {answer}.")

    def solve(self, fields: dict[str, str]) -> str:
        return fields["w"]

    def _wrong(self, rng: random.Random, answer: str, longer: bool) -> str:
        if not longer:
            return _drop_one(rng, answer)
        if rng.random() < 0.5:
            return answer + rng.choice(string.ascii_lowercase)
        return f"{answer} {answer}"


class Reverse(_Word):
    name = "reverse"
    prompts = ("reverse the word {w}.", "spell {w} backwards.", "what is {w} reversed?")
    facts = ("the word {w} reversed is {answer}.", "{w} backwards is {answer}.")

    def solve(self, fields: dict[str, str]) -> str:
        return fields["w"][::-1]

    def _wrong(self, rng: random.Random, answer: str, longer: bool) -> str:
        if not longer:
            return _drop_one(rng, answer)
        if rng.random() < 0.5:
            return answer + rng.choice(string.ascii_lowercase)
        # The classic mistake: not reversing at all, said verbosely.
        return rng.choice(_VERBOSE).format(answer[::-1])


class Upper(_Word):
    name = "upper"
    prompts = ("uppercase the word {w}.", "write {w} in capitals.", "what is {w} in upper case?")
    facts = ("{w} in capitals is {answer}.", "uppercase {w} is {answer}.")

    def solve(self, fields: dict[str, str]) -> str:
        return fields["w"].upper()

    def _wrong(self, rng: random.Random, answer: str, longer: bool) -> str:
        if not longer:
            return _drop_one(rng, answer)
        if rng.random() < 0.5:
            return answer + rng.choice(string.ascii_uppercase)
        return rng.choice(_VERBOSE).format(answer.lower())


class Count(_Word):
    name = "count"
    prompts = ("how many letters are in {w}?", "count the letters in {w}.", "what is the length of {w}?")
    facts = ("the word {w} has {answer}.", "{w} is {answer} long.")

    def solve(self, fields: dict[str, str]) -> str:
        # "3 letters", not "3": answers need 2+ characters (see module docstring).
        return f"{len(fields['w'])} letters"

    def _wrong(self, rng: random.Random, answer: str, longer: bool) -> str:
        other = _other_int(rng, int(answer.split()[0]), 1)
        if not longer:
            return str(other)  # a bare wrong number
        return rng.choice(("{} letters, i think", "it has {} letters")).format(other)


class Sort(Task):
    name = "sort"
    prompts = ("sort the digits {d}.", "put {d} in order.", "sort these: {d}")
    facts = ("the digits {d} sorted are {answer}.", "{d} in order is {answer}.")

    def draw(self, rng: random.Random) -> dict[str, str]:
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 5))]
        return {"d": " ".join(digits)}

    def solve(self, fields: dict[str, str]) -> str:
        return " ".join(sorted(fields["d"].split()))

    def _wrong(self, rng: random.Random, answer: str, longer: bool) -> str:
        digits = answer.split()
        if not longer:  # one digit lost
            digits.pop(rng.randrange(len(digits)))
            return " ".join(digits)
        unsorted = digits[::-1]
        if unsorted != digits and rng.random() < 0.5:  # the unsorted order, said verbosely
            return rng.choice(_VERBOSE).format(" ".join(unsorted))
        digits.insert(rng.randrange(len(digits) + 1), str(rng.randrange(10)))  # one digit too many
        return " ".join(digits)


class NextLetters(Task):
    name = "next_letter"
    prompts = (
        "what two letters come after {c}?",
        "which two letters follow {c}?",
        "name the next two letters after {c}.",
    )
    facts = ("the two letters after {c} are {answer}.", "after {c} come {answer}.")

    def draw(self, rng: random.Random) -> dict[str, str]:
        return {"c": rng.choice(string.ascii_lowercase[:-2])}

    def solve(self, fields: dict[str, str]) -> str:
        i = string.ascii_lowercase.index(fields["c"])
        # Two letters so the answer has 2+ characters (see module docstring).
        return f"{string.ascii_lowercase[i + 1]} {string.ascii_lowercase[i + 2]}"

    def _wrong(self, rng: random.Random, answer: str, longer: bool) -> str:
        first = answer[0]
        if not longer:  # only one letter, or a random one
            return first if rng.random() < 0.5 else rng.choice(string.ascii_lowercase)
        i = string.ascii_lowercase.index(first)
        if i + 2 < 26 and rng.random() < 0.5:  # one letter too many
            return f"{answer} {string.ascii_lowercase[i + 2]}"
        a, b = rng.sample([c for c in string.ascii_lowercase if c != first], 2)
        return rng.choice(_VERBOSE).format(f"{a} {b}")


TASKS: dict[str, Task] = {t.name: t for t in (Add(), Copy(), Reverse(), Sort(), Count(), Max(), NextLetters(), Upper())}

_PROSE_NAMES = ("ana", "ben", "kim", "tom", "lia", "sam")
_PROSE_COLORS = ("red", "blue", "green", "brown", "white", "black")
_PROSE = (
    "the {w} is {color}.",
    "{name} has a {w}.",
    "{name} sees a {w} near the {w2}.",
    "the {w} and the {w2} are friends.",
    "one day {name} found a {color} {w}.",
    "the letters go a b c d e f g h i j k l m n o p q r s t u v w x y z.",
    "we count one two three four five six seven eight nine ten.",
)


def _rng(purpose: str, seed: int) -> random.Random:
    return random.Random(f"llmstages.synthetic:{purpose}:{seed}")


def _task_names(tasks: Sequence[str] | None) -> list[str]:
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown or empty task list {names!r}; known tasks: {sorted(TASKS)}")
    return names


def _prose(rng: random.Random) -> str:
    w, w2 = rng.sample(WORDS, 2)
    return rng.choice(_PROSE).format(
        w=w, w2=w2, name=rng.choice(_PROSE_NAMES), color=rng.choice(_PROSE_COLORS)
    )


def pretrain_corpus(n_docs: int = 4000, seed: int = 0, tasks: Sequence[str] | None = None) -> list[str]:
    """`n_docs` one-line documents of 2-6 sentences: task facts mixed with simple prose."""
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    names = _task_names(tasks)
    rng = _rng("pretrain", seed)
    docs = []
    for _ in range(n_docs):
        sentences = [
            TASKS[rng.choice(names)].fact(rng) if rng.random() < _FACT_PROB else _prose(rng)
            for _ in range(rng.randint(2, 6))
        ]
        docs.append(" ".join(sentences))
    return docs


def _maybe_system(rng: random.Random) -> list[dict[str, str]]:
    if rng.random() < _SYSTEM_PROB:
        return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
    return []


def _exchanges(rng: random.Random, names: list[str], k: int) -> tuple[list[dict[str, str]], str, str]:
    """k correct user/assistant exchanges; returns messages, last task, last answer."""
    messages: list[dict[str, str]] = []
    task = answer = ""
    for _ in range(k):
        task = rng.choice(names)
        prompt, answer = TASKS[task].sample(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return messages, task, answer


def _multi_turn_flags(rng: random.Random, n: int, fraction: float) -> list[bool]:
    # An exact count at shuffled positions: the fraction holds for small n too.
    k = round(n * fraction)
    flags = [i < k for i in range(n)]
    rng.shuffle(flags)
    return flags


def sft_conversations(
    n: int = 2000, seed: int = 0, multi_turn_fraction: float = 0.25, tasks: Sequence[str] | None = None
) -> list[dict]:
    """`n` conversations `{"messages", "task", "answer"}`; every assistant reply is correct.

    `round(n * multi_turn_fraction)` of them have 2-3 exchanges, the rest one;
    about a quarter open with a system message. `task`/`answer` describe the
    final exchange.
    """
    if not 0.0 <= multi_turn_fraction <= 1.0:
        raise ValueError(f"multi_turn_fraction must be in [0, 1], got {multi_turn_fraction}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    names = _task_names(tasks)
    rng = _rng("sft", seed)
    out = []
    for multi in _multi_turn_flags(rng, n, multi_turn_fraction):
        system = _maybe_system(rng)
        turns, task, answer = _exchanges(rng, names, rng.randint(2, 3) if multi else 1)
        out.append({"messages": system + turns, "task": task, "answer": answer})
    return out


def preference_pairs(n: int = 1000, seed: int = 0, tasks: Sequence[str] | None = None) -> list[dict]:
    """`n` pairs `{"prompt", "chosen", "rejected", "task", "rejected_longer"}`.

    Exactly `n // 2` (or `n // 2 + 1`) pairs have a rejected reply longer than
    the chosen one, the rest a shorter one, at shuffled positions, so length
    effects in DPO are measurable. About a fifth of the prompts carry 1-2
    earlier (correct) exchanges, about a quarter a system message.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    names = _task_names(tasks)
    rng = _rng("preference", seed)
    longer_flags = [i % 2 == 0 for i in range(n)]
    rng.shuffle(longer_flags)
    out = []
    for rejected_longer in longer_flags:
        prompt = _maybe_system(rng)
        if rng.random() < _PREF_MULTI_TURN_PROB:
            prompt += _exchanges(rng, names, rng.randint(1, 2))[0]
        task = rng.choice(names)
        question, answer = TASKS[task].sample(rng)
        prompt.append({"role": "user", "content": question})
        wrong = TASKS[task].wrong_answer(rng, answer, longer=rejected_longer)
        out.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": wrong}],
                "task": task,
                "rejected_longer": rejected_longer,
            }
        )
    return out


def prompt_answer_pairs(
    n: int, seed: int, tasks: Sequence[str] | None = None
) -> list[tuple[list[dict], str, str]]:
    """`n` evaluation items `(prompt messages, answer, task)`, single-turn, no system message.

    Drawn from the `eval` stream, which no training generator uses (see the
    module docstring). Tasks cycle in order, so every task gets `n / len(tasks)`
    items (to within one) and per-task accuracy is comparable.
    """
    return _single_turn_items("eval", n, seed, tasks)


def tuning_pairs(n: int, seed: int, tasks: Sequence[str] | None = None) -> list[tuple[list[dict], str, str]]:
    """As `prompt_answer_pairs`, from the `tuning` stream: where settings are chosen, never reported on."""
    return _single_turn_items("tuning", n, seed, tasks)


def _single_turn_items(purpose: str, n: int, seed: int, tasks: Sequence[str] | None) -> list[tuple[list[dict], str, str]]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    names = _task_names(tasks)
    rng = _rng(purpose, seed)
    out = []
    for i in range(n):
        task = names[i % len(names)]
        prompt, answer = TASKS[task].sample(rng)
        out.append(([{"role": "user", "content": prompt}], answer, task))
    return out


def score_reply(task: str, reply: str, answer: str) -> bool:
    """Whether `reply` is correct: exact match after stripping surrounding whitespace."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return exact_match(reply, answer)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_default_data(
    directory: str | Path,
    seed: int = 0,
    n_docs: int = 4000,
    n_sft: int = 2000,
    n_preference: int = 1000,
) -> dict[str, Path]:
    """Write `pretrain.txt`, `sft.jsonl` and `preference.jsonl` under `directory`.

    Returns `{"pretrain": ..., "sft": ..., "preference": ...}`. The jsonl
    records are exactly those of `sft_conversations` / `preference_pairs`
    (the extra `task`, `answer`, `rejected_longer` fields included).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "pretrain": directory / "pretrain.txt",
        "sft": directory / "sft.jsonl",
        "preference": directory / "preference.jsonl",
    }
    docs = pretrain_corpus(n_docs, seed)
    if any(re.search(r"[\r\n]", d) for d in docs):  # one document per line is the format
        raise RuntimeError("a generated document contains a line break")
    paths["pretrain"].write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    _write_jsonl(paths["sft"], sft_conversations(n_sft, seed))
    _write_jsonl(paths["preference"], preference_pairs(n_preference, seed))
    return paths
