"""The variant benchmark's metric functions against hand-computed cases, and its --quick run end to end."""

import argparse

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import BENCHMARKS, load_benchmark
from llmstages.losses import IGNORE_INDEX as X


@pytest.fixture(scope="module")
def variants():
    return load_benchmark("variants.runner")


@pytest.fixture(scope="module")
def normalize():
    return load_benchmark("variants.normalize")


@pytest.fixture(scope="module")
def report():
    return load_benchmark("variants.report")


def test_gradient_cosine_and_relative_error(variants) -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert variants.cosine(a, b) == pytest.approx(0.0)
    assert variants.cosine(a, 3 * a) == pytest.approx(1.0)
    assert variants.relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == pytest.approx(4.0 / 3.0)
    assert variants.relative_error(b, b) == 0.0


def test_length_drift(variants) -> None:
    assert variants.length_drift([4, 6], [5, 5]) == pytest.approx(1.0)
    assert variants.length_drift([10, 10], [5, 5]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        variants.length_drift([1], [1, 2])


def test_token_weights_show_the_length_bias(normalize) -> None:
    """Two micro-batches: one example of 1 target token, one of 3. token weighs every token 1/N (N = 4);
    micro_batch gives the short example's token 1/(2*1) and the long one's 1/(2*3); sequence 1/(2*len)."""
    short = {"labels": torch.tensor([[X, 5]])}
    long = {"labels": torch.tensor([[X, 5, 6, 7]])}
    micro = [short, long]
    assert normalize.token_weights(micro, "token") == pytest.approx((1.0, 1.0))
    # relative to token's 1/4: micro_batch short 1/2 -> 2.0, long 1/6 -> 4/6
    assert normalize.token_weights(micro, "micro_batch") == pytest.approx((2.0, 4.0 / 6.0))
    assert normalize.token_weights(micro, "sequence") == pytest.approx((2.0, 4.0 / 6.0))
    assert normalize.token_weights(micro, "sum") == pytest.approx((4.0, 4.0))


@pytest.mark.distributed
def test_two_process_gradient_matches_the_full_batch_only_when_normalisation_is_exact(variants, normalize,
                                                                                       tmp_path) -> None:
    """2 gloo processes x 2 micro-batches of very different lengths: `token` gives the full-batch token-mean
    gradient; `micro_batch` gives the single-process micro_batch gradient, which is not the full-batch one."""
    from llmstages.stages import SFTModule

    torch.manual_seed(0)
    module = SFTModule(preset="tiny", vocab_size=64, generate_samples=0)
    init = tmp_path / "init.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, init)
    build = dict(preset="tiny", vocab_size=64, init_from=str(init), generate_samples=0)

    def batch(lengths: list[int], width: int = 20) -> dict:
        labels = torch.full((len(lengths), width), X)
        for row, n in enumerate(lengths):
            labels[row, 1:1 + n] = torch.randint(0, 64, (n,))
        return {"input_ids": torch.randint(0, 64, (len(lengths), width)), "labels": labels,
                "position_ids": torch.arange(width).expand(len(lengths), width)}

    micro = [batch([1, 2]), batch([18, 19]), batch([3, 1]), batch([17, 16])]
    single = SFTModule(**build)
    single.setup("fit")
    reference = normalize.step_gradient(single, [normalize.merge(micro)], "token")
    token = normalize.ddp_step_gradient({**build, "normalize": "token"}, micro, "token")
    assert variants.relative_error(token, reference) < 1e-5
    per_micro = normalize.ddp_step_gradient({**build, "normalize": "micro_batch"}, micro, "micro_batch")
    assert variants.relative_error(per_micro, normalize.step_gradient(single, micro, "micro_batch")) < 1e-5
    assert variants.relative_error(per_micro, reference) > 0.05


def test_real_data_files_reach_the_data_modules_and_key_the_checkpoints(variants, tmp_path) -> None:
    def bench(**files):
        args = argparse.Namespace(cache=str(tmp_path), preset="tiny", scale=0.1, **{"sft_data": None, "pref_data": None,
                                                                                     **files})
        return variants.Bench(args, tmp_path)

    given, embedded = bench(sft_data=[Path("a.json")], pref_data=[Path("b.json")]), bench()
    assert given.data("sft").files == [Path("a.json")] and given.data("preference").files == [Path("b.json")]
    assert embedded.data("sft").files is None and embedded.data("preference").files is None
    assert given.checkpoint_path("x") != embedded.checkpoint_path("x")  # other data never reuses a checkpoint
    assert embedded.code in embedded.checkpoint_path("x").name  # nor does other code


def test_code_hash_changes_with_any_source_or_config_file(variants, tmp_path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "s.yaml").write_text("lr: 1\n")
    folders = [tmp_path / "pkg", tmp_path / "cfg"]
    first = variants.code_hash(folders)
    assert variants.code_hash(folders) == first
    (tmp_path / "cfg" / "s.yaml").write_text("lr: 2\n")
    second = variants.code_hash(folders)
    (tmp_path / "pkg" / "b.py").write_text("")
    third = variants.code_hash(folders)
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    assert len({first, second, third}) == 3 and variants.code_hash(folders) == third


def test_summary_sentence_separates_only_beyond_the_seed_spread(report) -> None:
    results = {"a": [{"exact_match": 0.5}, {"exact_match": 0.7}], "b": [{"exact_match": 0.1}, {"exact_match": 0.1}],
               "c": [{"exact_match": 0.55}, {"exact_match": 0.75}]}
    text = report.summary_sentence("loss_mask", results)
    assert "default `a` scores 0.600 ± 0.141" in text
    assert "clearly worse: `b` (0.100)" in text and "none is clearly better" in text and "`c`" not in text
    results["d"] = [{"exact_match": 0.99}, {"exact_match": 0.99}]
    assert "clearly better: `d` (0.990)" in report.summary_sentence("loss_mask", results)
    lower = {"token": [{"val_loss": 2.0}, {"val_loss": 2.0}], "sum": [{"val_loss": 3.0}, {"val_loss": 3.0}]}
    assert "clearly worse: `sum` (3.000)" in report.summary_sentence("packing", lower)


def test_normalize_sentence_calls_its_metric_a_distance_from_token(report) -> None:
    """`grad_rel_error` is 0 for `token` by construction: far from it is not "worse" training."""
    results = {"token": [{"grad_rel_error": 0.0}, {"grad_rel_error": 0.0}],
               "sum": [{"grad_rel_error": 0.6}, {"grad_rel_error": 0.7}]}
    text = report.summary_sentence("normalize", results)
    assert "clearly further from it: `sum` (0.650)" in text and "worse" not in text
    assert "distance from the full-batch token-mean gradient" in text


@pytest.mark.slow
def test_quick_run_writes_reports(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.variants", "--quick", "--seeds", "0", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=900, cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for family in ("loss_mask", "normalize", "packing", "dpo", "grpo", "alignment"):
        text = (out / f"{family}.md").read_text()
        assert "Mean ± standard deviation" in text and "command:" in text
        assert (out / f"{family}_metrics.png").stat().st_size > 0
    assert "ddp_grad_rel_error" in (out / "normalize.md").read_text()
    assert (out / "grpo_length_curves.png").stat().st_size > 0 and "Before GRPO" in (out / "grpo.md").read_text()
