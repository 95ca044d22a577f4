"""The README's main job, shrunk: all five stages chained through the real CLI and configs."""

import pytest
import torch

from llmstages.tools.demo import main


def test_demo_runs_all_five_stages_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["--out", str(out), "--scale", "0.02"])
    for stage in ("pretrain", "sft", "reward", "dpo", "grpo"):  # each stage's finished run is its `latest`
        assert (out / stage / "latest" / "checkpoints" / "last.ckpt").exists(), stage
        assert (out / stage / "latest" / "config.yaml").exists(), stage
    printed = capsys.readouterr().out
    assert "what each stage learned" in printed
    for stage in ("pretrain", "sft", "reward", "dpo", "grpo"):
        assert stage in printed
    import torch

    chain = {"sft": "pretrain", "reward": "sft", "dpo": "sft", "grpo": "sft"}
    for stage, parent in chain.items():
        hp = torch.load(out / stage / "latest" / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
        assert hp["init_from"] == str((out / parent / "latest" / "checkpoints" / "last.ckpt").resolve())


def test_demo_summary_is_what_the_checkpoints_do(tmp_path):
    """summary.json (the table's numbers): every stage timed; GRPO trained on the tasks the mistakes step chose;
    the held-out exact match of the GRPO row recomputed here from its checkpoint, one prompt at a time."""
    import json

    import yaml

    from llmstages.data import SFTData, synthetic
    from llmstages.model.checkpoint import load_model
    from llmstages.model.generate import generate

    out = tmp_path / "demo"
    main(["--out", str(out), "--scale", "0.02", "--seed", "1"])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["pretrain", "sft", "reward", "dpo", "grpo"]
    for row in summary["stages"].values():
        assert row["time"]["wall"] > 0 and row["time"]["cpu"] > 0
    grpo_data = yaml.safe_load((out / "grpo" / "demo.yaml").read_text())["data"]["init_args"]
    assert grpo_data["seed"] == 1
    with open(grpo_data["files"][0]) as f:
        assert {json.loads(line)["task"] for line in f} == set(summary["grpo_tasks"])

    held = summary["settings"]["held_out"]
    data = SFTData(cache_dir=str(out / "cache"))
    model = load_model(out / "grpo" / "latest" / "checkpoints" / "last.ckpt").model
    stop = data.template.stop_token_id(data.tokenizer)
    right = 0
    for messages, answer, _ in synthetic.prompt_answer_pairs(held["prompts"], seed=held["seed"]):
        ids, stopped = generate(model, data.template.encode_prompt(messages, data.tokenizer), held["max_new_tokens"], stop_id=stop)
        right += stopped and data.tokenizer.decode(ids, skip_special_tokens=True).strip() == answer
    assert summary["stages"]["grpo"]["held_out"]["exact_match"] == right / held["prompts"]


@pytest.mark.parametrize("stage", ["reward", "sft"])
def test_ranking_reads_a_reward_model_by_reward_and_a_policy_by_log_probability(stage, cache_dir):
    """The demo's `right > SFT's wrong` column: the reward model's reward, a policy's reply log-probability,
    each recomputed here one pair at a time."""
    from llmstages.data import SFTData, synthetic
    from llmstages.losses import IGNORE_INDEX
    from llmstages.stages import RewardModule, SFTModule
    from llmstages.tools.demo import ranking
    from llmstages.tools.mistakes import mistake_pair

    data = SFTData(cache_dir=cache_dir)
    torch.manual_seed(0)
    module = (RewardModule if stage == "reward" else SFTModule)(preset="tiny", vocab_size=data.vocab_size)
    module.setup("fit")
    items = synthetic.tuning_pairs(12, seed=2)
    pairs = [mistake_pair(m, answer, answer + "0" if i % 2 else "z") for i, (m, answer, _) in enumerate(items)]
    pairs = [p for p in pairs if p is not None]  # `z` may be a right answer

    def score(pair, side) -> float:
        prompt, sides = data.template.encode_pair(pair["prompt"], {side: pair[side]}, data.tokenizer)
        ids = torch.tensor([prompt + sides[side]["input_ids"]])
        labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + sides[side]["labels"]])
        with torch.no_grad():
            if stage == "reward":
                return float(module.rewards(ids, labels)[0])
            logp = torch.log_softmax(module.backbone(ids)[0].double(), -1)
            return sum(float(logp[t - 1, ids[0, t]]) for t in range(1, ids.shape[1]) if labels[0, t] != IGNORE_INDEX)

    wins = sum(score(p, "chosen") > score(p, "rejected") for p in pairs)
    assert 0 < wins < len(pairs)
    assert ranking(module, pairs, data) == wins / len(pairs)
