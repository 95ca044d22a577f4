"""Tests for the embedded default data sets (llmstages.data.synthetic).

Answers are re-derived here from the rendered prompt text by an independent
solver (parse the numbers / the word, compute), not by calling the tasks.
"""

from __future__ import annotations

import json
import random
import re
import string

import pytest

from llmstages.data.synthetic import (
    TASKS,
    WORDS,
    preference_pairs,
    pretrain_corpus,
    prompt_answer_pairs,
    tuning_pairs,
    score_reply,
    sft_conversations,
    write_default_data,
)

ROLES = {"system", "user", "assistant"}


def solve(prompt: str) -> tuple[str, str]:
    """Independent solver: (task, answer) from a user prompt's text."""
    ints = [int(x) for x in re.findall(r"\d+", prompt)]
    if "two letters" in prompt:
        (c,) = re.findall(r"\b([a-z])\b", prompt)
        i = string.ascii_lowercase.index(c)
        return "next_letter", f"{string.ascii_lowercase[i + 1]} {string.ascii_lowercase[i + 2]}"
    if "plus" in prompt or "+" in prompt or prompt.startswith("add "):
        a, b = ints
        return "add", str(a + b)
    if any(k in prompt for k in ("largest", "biggest", "max")):
        return "max", str(max(ints))
    if any(k in prompt for k in ("sort", "order")):
        return "sort", " ".join(str(d) for d in sorted(ints))
    (w,) = [t for t in re.findall(r"[a-z]+", prompt) if t in WORDS]
    if "revers" in prompt or "backwards" in prompt:
        return "reverse", w[::-1]
    if "capitals" in prompt or "upper" in prompt:
        return "upper", w.upper()
    if "letters" in prompt or "length" in prompt:
        return "count", f"{len(w)} letters"
    if any(k in prompt for k in ("repeat", "say", "copy")):
        return "copy", w
    raise AssertionError(f"unrecognised prompt {prompt!r}")


def check_messages(messages: list[dict], *, last: str) -> None:
    assert messages, "empty conversation"
    for i, m in enumerate(messages):
        assert set(m) == {"role", "content"}
        assert m["role"] in ROLES
        assert isinstance(m["content"], str) and m["content"].strip()
        assert m["role"] != "system" or i == 0, "system message only first"
    assert messages[-1]["role"] == last
    roles = [m["role"] for m in messages if m["role"] != "system"]
    assert roles[0] == "user"
    for a, b in zip(roles, roles[1:]):
        assert a != b, f"two {a} messages in a row"


def test_registry_names():
    assert set(TASKS) == {"add", "copy", "reverse", "sort", "count", "max", "next_letter", "upper"}
    for name, task in TASKS.items():
        assert task.name == name
        assert 2 <= len(task.prompts) <= 3


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_answers_and_wrong_answers(name: str):
    task = TASKS[name]
    rng = random.Random(123)
    phrasings = set()
    for _ in range(300):
        prompt, answer = task.sample(rng)
        assert solve(prompt) == (name, answer)
        assert len(answer) >= 2 and answer == answer.strip()
        assert score_reply(name, answer, answer)
        assert score_reply(name, f"  {answer}\n", answer)
        # The phrasing with the problem's words, letters and numbers blanked out.
        blank = lambda m: "#" if m[0] in WORDS or len(m[0]) == 1 or m[0].isdigit() else m[0]  # noqa: E731
        phrasings.add(re.sub(r"[a-z]+|\d+", blank, prompt))
        for longer in (True, False):
            wrong = task.wrong_answer(rng, answer, longer=longer)
            assert wrong != answer and wrong.strip()
            assert not score_reply(name, wrong, answer)
            assert (len(wrong) > len(answer)) if longer else (len(wrong) < len(answer))
            if name == "count":  # the wrong count is really wrong, not the right one reformatted
                assert answer.split()[0] not in wrong
    assert len(phrasings) >= 2


def test_score_reply_exact_match_and_unknown_task():
    assert score_reply("add", "47", "47")
    assert not score_reply("add", "47.", "47")
    assert not score_reply("add", "4 7", "47")
    assert not score_reply("upper", "cat", "CAT")
    with pytest.raises(ValueError):
        score_reply("nope", "1", "1")


@pytest.mark.parametrize(
    "make",
    [
        lambda s: pretrain_corpus(200, seed=s),
        lambda s: sft_conversations(200, seed=s),
        lambda s: preference_pairs(200, seed=s),
        lambda s: prompt_answer_pairs(200, seed=s),
        lambda s: tuning_pairs(200, seed=s),
    ],
    ids=["pretrain", "sft", "preference", "eval", "tuning"],
)
def test_deterministic_per_seed(make):
    state = random.getstate()
    assert make(0) == make(0)
    assert make(0) != make(1)
    assert random.getstate() == state, "the global RNG must not be used"


def test_pretrain_corpus_facts_are_true_and_single_line():
    docs = pretrain_corpus(600, seed=3)
    assert len(docs) == 600
    text = " ".join(docs)
    for d in docs:
        assert d and d == d.strip() and "\n" not in d and "\r" not in d
    adds = re.findall(r"(\d+) plus (\d+) is (\d+)\.", text) + re.findall(r"(\d+) \+ (\d+) = (\d+)\.", text)
    adds += re.findall(r"what is (\d+) plus (\d+)\? (\d+)\.", text)
    assert len(adds) > 50
    assert all(int(a) + int(b) == int(c) for a, b, c in adds)
    revs = re.findall(r"the word ([a-z]+) reversed is ([a-z]+)\.", text)
    assert revs and all(w[::-1] == r for w, r in revs)
    caps = re.findall(r"([a-z]+) in capitals is ([A-Z]+)\.", text)
    assert caps and all(w.upper() == u for w, u in caps)
    counts = re.findall(r"the word ([a-z]+) has (\d) letters\.", text)
    assert counts and all(len(w) == int(n) for w, n in counts)
    for marker in ("copied is", "sorted are", "largest of", "two letters after", "are friends."):
        assert marker in text, marker


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.6, 1.0])
def test_sft_conversations_schema_correctness_and_multi_turn_fraction(fraction: float):
    n = 400
    convs = sft_conversations(n, seed=5, multi_turn_fraction=fraction)
    assert len(convs) == n
    multi = 0
    systems = 0
    for conv in convs:
        assert set(conv) == {"messages", "task", "answer"}
        msgs = conv["messages"]
        check_messages(msgs, last="assistant")
        systems += msgs[0]["role"] == "system"
        turns = [m for m in msgs if m["role"] != "system"]
        exchanges = list(zip(turns[::2], turns[1::2]))
        assert 1 <= len(exchanges) <= 3
        multi += len(exchanges) > 1
        for user, assistant in exchanges:
            task, answer = solve(user["content"])
            assert assistant["content"] == answer
        assert conv["answer"] == msgs[-1]["content"]
        assert conv["task"] == solve(turns[-2]["content"])[0]
    assert abs(multi / n - fraction) <= 0.02
    assert 0.1 < systems / n < 0.4
    assert {c["task"] for c in convs} == set(TASKS)


def test_sft_conversations_rejects_bad_fraction():
    with pytest.raises(ValueError):
        sft_conversations(10, multi_turn_fraction=1.5)
    with pytest.raises(ValueError):
        sft_conversations(10, tasks=["nope"])


def test_task_subset():
    convs = sft_conversations(50, seed=0, tasks=["add", "upper"])
    assert {c["task"] for c in convs} == {"add", "upper"}


def test_preference_pairs_balanced_correct_and_wrong():
    n = 600
    pairs = preference_pairs(n, seed=7)
    assert len(pairs) == n
    n_longer = sum(p["rejected_longer"] for p in pairs)
    assert abs(n_longer - n / 2) <= 0.05 * n and abs(n_longer - n / 2) <= 1
    multi_turn = 0
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "task", "rejected_longer"}
        check_messages(p["prompt"], last="user")
        multi_turn += sum(m["role"] == "user" for m in p["prompt"]) > 1
        for m in p["prompt"]:  # earlier assistant turns are correct too
            if m["role"] == "assistant":
                prev = p["prompt"][p["prompt"].index(m) - 1]
                assert m["content"] == solve(prev["content"])[1]
        (chosen,), (rejected,) = p["chosen"], p["rejected"]
        assert chosen["role"] == rejected["role"] == "assistant"
        task, answer = solve(p["prompt"][-1]["content"])
        assert p["task"] == task and chosen["content"] == answer
        assert score_reply(task, chosen["content"], answer)
        assert not score_reply(task, rejected["content"], answer) and rejected["content"].strip()
        longer = len(rejected["content"]) > len(chosen["content"])
        shorter = len(rejected["content"]) < len(chosen["content"])
        assert longer if p["rejected_longer"] else shorter
    assert 0.1 * n < multi_turn < 0.35 * n


def test_prompt_answer_pairs_correct_balanced_and_not_the_training_stream():
    items = prompt_answer_pairs(160, seed=0)
    per_task = {name: 0 for name in TASKS}
    for messages, answer, task in items:
        check_messages(messages, last="user")
        assert solve(messages[-1]["content"]) == (task, answer)
        per_task[task] += 1
    assert set(per_task.values()) == {20}
    eval_prompts = [m[-1]["content"] for m, _, _ in items]
    train_prompts = [c["messages"][-2]["content"] for c in sft_conversations(160, seed=0, multi_turn_fraction=0.0)]
    assert eval_prompts != train_prompts


def test_tuning_pairs_correct_and_not_the_evaluation_stream():
    items = tuning_pairs(160, seed=0, tasks=["add", "sort"])
    for messages, answer, task in items:
        check_messages(messages, last="user")
        assert solve(messages[-1]["content"]) == (task, answer)
    assert [t for _, _, t in items] == ["add", "sort"] * 80
    held_out = {m[-1]["content"] for m, _, _ in prompt_answer_pairs(160, seed=0, tasks=["add", "sort"])}
    tuning = [m[-1]["content"] for m, _, _ in items]
    assert sum(p in held_out for p in tuning) < 16  # the same facts can recur, the streams differ


def test_write_default_data_round_trip(tmp_path):
    paths = write_default_data(tmp_path / "data", seed=2, n_docs=300, n_sft=200, n_preference=100)
    assert set(paths) == {"pretrain", "sft", "preference"}
    assert [p.name for p in paths.values()] == ["pretrain.txt", "sft.jsonl", "preference.jsonl"]
    lines = paths["pretrain"].read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and lines[:-1] == pretrain_corpus(300, seed=2)
    with paths["sft"].open(encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == sft_conversations(200, seed=2)
    with paths["preference"].open(encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == preference_pairs(100, seed=2)
