"""What a user sees at the command line: one-line errors, fast help, plain-text masks, readable exports."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clirun import CONFIGS, ROOT, env, run
from llmstages.tools import TOOLS

HEAVY = ("torch", "lightning", "jsonargparse", "transformers")


def _imported_after(argv: list[str]) -> list[str]:
    """The heavy modules `llmstages <argv>` has imported when it exits (run in a fresh interpreter)."""
    code = (
        "import sys\nfrom llmstages.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('IMPORTED', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    line = next(line for line in out.stdout.splitlines() if line.startswith("IMPORTED"))
    return eval(line.removeprefix("IMPORTED "))


@pytest.mark.parametrize("command", ["", *TOOLS])
def test_help_imports_neither_torch_nor_lightning(command):
    assert _imported_after([command, "--help"] if command else ["--help"]) == []


def test_usage_lists_every_tool_with_its_help(capsys):
    from llmstages.cli import main

    main(["--help"])
    out = capsys.readouterr().out
    for name, tool in TOOLS.items():
        assert f"  {name}" in out and tool.help in out


def _one_line_error(result, *expected: str) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("llmstages: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_tool_user_errors_are_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "missing.ckpt"
    _one_line_error(run(["generate", "--model", str(missing), "--prompt", "hi"], tmp_path, timeout=60),
                    "llmstages: generate: ", str(missing), "no such checkpoint file")
    _one_line_error(run(["import", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.ckpt")], tmp_path,
                        timeout=60), "llmstages: import: ", "nowhere: no such Hugging Face model folder")
    # with LLMSTAGES_DEBUG=1 the same error shows its traceback
    debug = run(["generate", "--model", str(missing), "--prompt", "hi"], tmp_path, timeout=60, LLMSTAGES_DEBUG="1")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_fit_user_errors_are_one_line_and_exit_2(tmp_path, cache):
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n" + json.dumps({"messages": "not a list"}) + "\n")
    base = ["fit", "--config", str(CONFIGS / "sft.yaml"), "--model.init_args.preset", "tiny",
            "--data.init_args.cache_dir", str(cache), "--trainer.default_root_dir", str(tmp_path / "runs")]
    _one_line_error(run([*base, "--data.init_args.files", f"[{bad}]"], tmp_path, timeout=120),
                    "llmstages: fit: ", f"{bad}:2", "messages")
    _one_line_error(run([*base, "--model.init_args.init_from", str(tmp_path / "no-such-folder")], tmp_path, timeout=120),
                    "llmstages: fit: ", "no-such-folder")


def test_a_stage_option_that_cannot_work_is_one_line_and_exit_2(tmp_path, cache):
    # raised in the stage's __init__, which jsonargparse wraps in its own error: still the user's, not a traceback
    _one_line_error(run(["fit", "--config", str(CONFIGS / "orpo.yaml"), "--model.init_args.preset", "tiny",
                         "--model.init_args.beta", "-1", "--data.init_args.cache_dir", str(cache),
                         "--trainer.default_root_dir", str(tmp_path / "runs")], tmp_path, timeout=120),
                    "llmstages: fit: ", "beta must be >= 0, got -1")


def test_every_error_a_user_can_fix_is_a_user_error_by_its_type():
    from llmstages.data.formats import DataFormatError
    from llmstages.errors import ConfigError, UserError, is_user_error
    from llmstages.model.checkpoint import CheckpointError
    from llmstages.options import check_choice
    from llmstages.run_plan import RunFolderError

    for error_type in (DataFormatError, CheckpointError, RunFolderError, ConfigError):
        assert issubclass(error_type, UserError)
    with pytest.raises(ValueError, match="unknown normalize 'tokn'; choose one of: token, sequence") as refused:
        check_choice("normalize", "tokn", ("token", "sequence"))
    assert is_user_error(refused.value)
    wrapped = ValueError("jsonargparse's wrapper")
    wrapped.__cause__ = refused.value
    assert is_user_error(wrapped) and not is_user_error(ValueError("a bug")) and not is_user_error(KeyError("x"))


def test_a_mistyped_preset_is_refused_by_the_parser_listing_every_preset(tmp_path):
    from llmstages.model.config import PRESETS

    result = run(["fit", "--config", str(CONFIGS / "sft.yaml"), "--model.init_args.preset", "tinyy",
                  "--print_config"], tmp_path, timeout=60)
    assert result.returncode != 0 and "tinyy" in result.stderr
    assert all(repr(name) in result.stderr for name in PRESETS)


def test_masks_marks_labelled_tokens_in_plain_text_and_takes_data_overrides(tmp_path, cache):
    args = ["masks", "--config", str(CONFIGS / "sft.yaml"), "-n", "2", "--data.init_args.cache_dir", str(cache),
            "--data.init_args.seq_len", "96"]
    result = run([*args, "--data.init_args.loss_mask", "last_assistant"], tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.split("⟦")[1:]]
    assert rows, result.stdout
    # piped (no terminal): every labelled run is bracketed, and with last_assistant only the final reply is,
    # so each shown row has exactly one bracketed run ending at the end-of-turn token
    assert result.stdout.count("⟦") == result.stdout.count("⟧") == 3  # the legend and one run per row
    assert all("<|im_end|>⟧" in row for row in rows[1:])
    assert "⟦labelled⟧ / not labelled" in result.stdout
    _one_line_error(run([*args, "--trainer.max_steps", "3"], tmp_path, timeout=60), "--trainer.max_steps")


def test_exported_weights_are_readable_like_the_other_files(tmp_path):
    from llmstages.model.config import ModelConfig
    from llmstages.model.hf import to_hf
    from llmstages.model.transformer import Transformer

    folder = to_hf(Transformer(ModelConfig.from_name("tiny")), tmp_path / "hf")
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    assert modes["model.safetensors"] & stat.S_IROTH or os.umask(os.umask(0)) & stat.S_IROTH


# ---------------------------------------------------------------- what a run prints into a log file

NOISE = ("💡 Tip", "dirpath has changed", "returned a view tensor", "Traceback")


def test_fit_into_a_log_file_prints_step_lines_and_no_known_noise(tmp_path, cache):
    from clirun import fit_args, ok, tiny_fragment

    fragment = tiny_fragment(tmp_path, cache, steps=6, extra={"trainer": {
        "enable_progress_bar": True, "log_every_n_steps": 2, "val_check_interval": 3, "limit_val_batches": 1,
        "default_root_dir": str(tmp_path / "runs")}})
    result = run(fit_args("sft", fragment), tmp_path, timeout=180, PYTHONWARNINGS="default")
    ok(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("sft step ")]
    # stdout is a file here: a plain line every log_every_n_steps optimiser steps, with loss, tokens/s and ETA
    assert [line.split(" | ")[0] for line in lines] == ["sft step 2/6", "sft step 4/6", "sft step 6/6"], result.stdout
    for line in lines:
        fields = dict(part.split(" ", 1) for part in line.split(" | ")[1:])
        assert float(fields["loss"]) > 0 and float(fields["tokens/s"]) > 0 and "ETA" in fields
    assert "sft validation at step 6: " in result.stdout and "val/loss" in result.stdout
    assert "\r" not in result.stdout and "━" not in result.stdout  # no live bar written into a file
    last = next((tmp_path / "runs" / "sft").glob("*/checkpoints/last.ckpt"))
    validate = run(["validate", "--config", str(CONFIGS / "sft.yaml"), "--config", str(fragment),
                    "--ckpt_path", str(last)], tmp_path, timeout=180, PYTHONWARNINGS="default")
    ok(validate)
    for output in (result, validate):
        for noise in NOISE:
            assert noise not in output.stdout + output.stderr, (noise, output.stderr[-3000:])


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_fit_prints_no_view_tensor_warning(tmp_path, cache):
    from clirun import fit_args, ok, tiny_fragment

    fragment = tiny_fragment(tmp_path, cache, steps=3, extra={"trainer": {"devices": 2, "accelerator": "cpu"}})
    result = run(fit_args("sft", fragment, "--config", str(CONFIGS / "fragments" / "fsdp.yaml"),
                          "--trainer.devices", "2", "--trainer.accelerator", "cpu"),
                 tmp_path, timeout=300, PYTHONWARNINGS="default")
    ok(result)
    for noise in NOISE:
        assert noise not in result.stdout + result.stderr, (noise, result.stderr[-3000:])


def test_log_lines_also_come_by_time_between_step_multiples(tmp_path, cache):
    """`seconds` bounds the silence: with seconds=0 every optimiser step prints, though `every` is never reached."""
    from clirun import fit_args, ok, tiny_fragment

    progress = {"class_path": "llmstages.progress.LogProgress", "init_args": {"every": 1000, "seconds": 0.0}}
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 3}}
    fragment = tiny_fragment(tmp_path, cache, steps=3, accumulate=2, extra={"trainer": {
        "enable_progress_bar": True, "callbacks": [checkpoint, progress], "default_root_dir": str(tmp_path / "runs")}})
    result = run(fit_args("sft", fragment), tmp_path, timeout=180)
    ok(result)
    steps = [line.split(" | ")[0] for line in result.stdout.splitlines() if line.startswith("sft step ")]
    assert steps == ["sft step 1/3", "sft step 2/3", "sft step 3/3"], result.stdout  # optimiser steps, not micro-batches
