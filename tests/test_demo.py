"""The README's main job, shrunk: all five stages chained through the real CLI and configs."""

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
