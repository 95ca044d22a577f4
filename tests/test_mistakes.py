"""The demo's own-mistakes step: pairs from a model's wrong greedy replies, its weakest tasks, files the data modules read."""

import pytest
import torch

from llmstages.data import PreferenceData, PromptData, SFTData, synthetic
from llmstages.model.config import ModelConfig
from llmstages.model.generate import generate
from llmstages.model.transformer import Transformer
from llmstages.tools import mistakes


@pytest.fixture(scope="module")
def chat(cache_dir):
    data = SFTData(cache_dir=cache_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=data.vocab_size)).eval()
    return model, data


def greedy_reply(model, data, messages, budget=8) -> tuple[str, bool]:
    """The reference: one prompt at a time through `generate` (no batching, no left padding)."""
    ids, stopped = generate(model, data.template.encode_prompt(messages, data.tokenizer), budget,
                            stop_id=data.template.stop_token_id(data.tokenizer))
    return data.tokenizer.decode(ids, skip_special_tokens=True).strip(), stopped


def test_wrong_replies_become_pairs_and_right_ones_count(chat):
    model, data = chat
    items = synthetic.tuning_pairs(12, seed=3, tasks=["add", "copy", "sort"])
    references = [greedy_reply(model, data, messages) for messages, _, _ in items]
    # every other item's "answer" is the model's own reply: right if it stopped, so it must not become a pair
    asked = [(m, reply if i % 2 == 0 else answer, task) for i, ((m, answer, task), (reply, _)) in enumerate(zip(items, references))]
    found = mistakes.find_mistakes(model, data.tokenizer, data.template, asked, max_new_tokens=8, batch_size=5)
    expected_pairs = [
        {"prompt": m, "chosen": [{"role": "assistant", "content": answer}], "rejected": [{"role": "assistant", "content": reply}]}
        for (m, answer, _), (reply, stopped) in zip(asked, references)
        if not (stopped and reply == answer) and reply and reply != answer
    ]
    assert found.pairs == expected_pairs
    right = {task: 0 for task in ("add", "copy", "sort")}
    for (_, answer, task), (reply, stopped) in zip(asked, references):
        right[task] += stopped and reply == answer
    assert found.correct == right and found.asked == {"add": 4, "copy": 4, "sort": 4}
    assert found.overall() == sum(right.values()) / 12


def test_weakest_tasks_skip_the_ones_never_right():
    accuracy = {"add": 0.0, "copy": 0.9, "sort": 0.2, "max": 0.1, "upper": 0.5}
    assert mistakes.weakest_tasks(accuracy, 2, min_accuracy=0.05) == ["max", "sort"]
    assert mistakes.weakest_tasks(accuracy, 2, min_accuracy=0.0) == ["add", "max"]
    assert mistakes.weakest_tasks(accuracy, 2, min_accuracy=0.95) == []


def test_written_files_are_what_dpo_and_grpo_read(tmp_path, cache_dir):
    pairs = [{"prompt": m, "chosen": [{"role": "assistant", "content": a}],
              "rejected": [{"role": "assistant", "content": a + "0"}]} for m, a, _ in synthetic.tuning_pairs(20, seed=0)]
    preference = PreferenceData(files=[str(mistakes.write_jsonl(tmp_path / "pairs.jsonl", pairs))], cache_dir=cache_dir,
                                val_fraction=0.0)
    preference.setup("fit")
    assert len(preference.train_set) == 20
    records = mistakes.grpo_prompt_records(["sort", "max"], 30, seed=1)
    assert {r["task"] for r in records} == {"sort", "max"}
    for record in records:
        assert record["prompt"][-1]["role"] == "user"
        if record["task"] == "max":  # the answer checked by a formula written here
            numbers = [int(w) for w in record["prompt"][-1]["content"].replace("?", " ").replace(".", " ").replace(":", " ").split() if w.isdigit()]
            assert record["answer"] == str(max(numbers))
    prompts = PromptData(files=[str(mistakes.write_jsonl(tmp_path / "prompts.jsonl", records))], cache_dir=cache_dir,
                         val_fraction=0.0)
    prompts.setup("fit")
    assert sorted(item["answer"] for item in prompts.train_set) == sorted(r["answer"] for r in records)


def reply_logp(model, data, messages, reply: str) -> float:
    """The reference: one sequence alone, the reply's tokens (as the demo's models emit them: text, then
    the end-of-turn token) scored by a log-softmax written here."""
    prompt = data.template.encode_prompt(messages, data.tokenizer)
    answer = data.tokenizer.encode(reply) + [data.template.stop_token_id(data.tokenizer)]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer]))[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(prompt) + i - 1, token]) for i, token in enumerate(answer))


def test_ranking_accuracy_counts_pairs_a_model_scores_right_first(chat):
    model, data = chat
    items = synthetic.tuning_pairs(9, seed=5, tasks=["copy", "upper", "max"])
    pairs = [mistakes.mistake_pair(m, answer, reply)
             for m, answer, _ in items for reply in (answer[::-1] + "x", answer + answer)]
    assert mistakes.mistake_pair(items[0][0], "cat", "cat ") is None and mistakes.mistake_pair(items[0][0], "cat", "") is None
    wins = [reply_logp(model, data, p["prompt"], p["chosen"][0]["content"])
            > reply_logp(model, data, p["prompt"], p["rejected"][0]["content"]) for p in pairs]
    assert 0 < sum(wins) < len(pairs)  # the random model ranks some pairs each way: the count is informative
    for batch_size in (1, 4, 64):
        got = mistakes.ranking_accuracy(mistakes.policy_logps(model), pairs, data.tokenizer, data.template, batch_size)
        assert got == sum(wins) / len(pairs)
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    assert mistakes.ranking_accuracy(mistakes.policy_logps(model), swapped, data.tokenizer, data.template) == \
        pytest.approx(1 - sum(wins) / len(pairs))
