"""A run you can trust end to end, through the real `llmstages` command: multi-process fits, run
folders, non-finite stops, W&B without a server, atomic and readable checkpoints, honest caches."""

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml

from clirun import LLMSTAGES, TORCHRUN, fit_args, ok, run, start, tiny_fragment
from llmstages import checkpointing as ckpt


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _one_run(stage_root: Path) -> Path:
    runs = [p for p in stage_root.iterdir() if not p.name.startswith(".") and p.name != "latest"]
    assert len(runs) == 1, runs
    return runs[0]


def _assert_one_checkpoint_set(run_dir: Path) -> None:
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in files and not [f for f in files if f.startswith(".")], files
    state = ckpt.load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 2
    assert (run_dir / "config.yaml").exists()
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()


# ----------------------------------------------------------------------------- multi-process, console entry point


def _readme_command(marker: str, **values: str) -> list[str]:
    """The README's command line containing `marker`, with its placeholders (G, N, HOST:29500) filled in."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("torchrun") and marker in line)
    words = line.split()
    words = [values.get(w, w) for w in words]
    words = [w.replace("HOST:29500", values.get("HOST:29500", "HOST:29500")) for w in words]
    assert words[0] == "torchrun"
    return [TORCHRUN, *words[1:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_torchrun_ddp_fit_as_in_the_readme(tmp_path, cache):
    """The README's one-node torchrun line, word for word, with G=2 (plus a tiny, CPU config)."""
    command = _readme_command("--standalone", G="2")
    fragment = tiny_fragment(tmp_path, cache, steps=2)
    extra = ["--config", str(fragment), "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "runs")]
    ok(run(extra, Path(__file__).parents[1], timeout=150, launcher=command))
    run_dir = _one_run(tmp_path / "runs" / "sft")  # rank 1 created no folder of its own
    _assert_one_checkpoint_set(run_dir)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_multi_node_command_as_in_the_readme(tmp_path, cache):
    """The README's multi-node line with N=1 node of G=2 processes and a local rendezvous."""
    command = _readme_command("--nnodes", G="2", N="1", **{"HOST:29500": f"127.0.0.1:{_free_port()}"})
    fragment = tiny_fragment(tmp_path, cache, steps=2)
    extra = ["--config", str(fragment), "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "runs")]
    ok(run(extra, Path(__file__).parents[1], timeout=150, launcher=command))
    _assert_one_checkpoint_set(_one_run(tmp_path / "runs" / "sft"))


@pytest.mark.distributed
def test_fsdp2_fragment_fit_through_the_console_entry_point(tmp_path, cache):
    fragment = tiny_fragment(tmp_path, cache, steps=2)
    args = fit_args("sft", fragment, "--config", "configs/fragments/fsdp.yaml", "--trainer.devices", "2",
                    "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "runs"))
    result = run(args, Path(__file__).parents[1], timeout=150)
    ok(result)
    run_dir = _one_run(tmp_path / "runs" / "sft")
    _assert_one_checkpoint_set(run_dir)
    state = ckpt.load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert state["hyper_parameters"]["model"]["vocab_size"] == state["state_dict"]["backbone.embed.weight"].shape[0]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_spawn_fit_through_the_console_entry_point(tmp_path, cache):
    fragment = tiny_fragment(tmp_path, cache, steps=2)
    args = fit_args("sft", fragment, "--config", "configs/fragments/ddp.yaml", "--trainer.devices", "2",
                    "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "runs"))
    ok(run(args, Path(__file__).parents[1], timeout=150))
    _assert_one_checkpoint_set(_one_run(tmp_path / "runs" / "sft"))


# ----------------------------------------------------------------------------- run folders


@pytest.mark.distributed
def test_concurrent_fits_of_one_config_keep_separate_run_folders(tmp_path, cache):
    fragment = tiny_fragment(tmp_path, cache, steps=2)
    ok(run(fit_args("sft", fragment, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "warm")),
           tmp_path))  # tokenizer and data caches exist before the race
    root = tmp_path / "runs"
    processes = [start(fit_args("sft", fragment, "--model.init_args.lr", lr, "--trainer.default_root_dir", str(root)),
                       tmp_path) for lr in ("0.001", "0.002")]
    for p in processes:
        assert p.wait(timeout=150) == 0, p.stdout.read()[-3000:]
    runs = sorted(p for p in (root / "sft").iterdir() if p.name != "latest")
    assert len(runs) == 2
    lrs = set()
    for run_dir in runs:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        lrs.add(config["model"]["init_args"]["lr"])
        state = ckpt.load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
        assert state["hyper_parameters"]["lr"] == config["model"]["init_args"]["lr"]  # its own checkpoint
        assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert lrs == {0.001, 0.002}
    assert (root / "sft" / "latest").resolve() in {r.resolve() for r in runs}


def test_claim_run_dir_never_hands_out_a_taken_folder(tmp_path):
    first, second = ckpt.claim_run_dir(tmp_path, None), ckpt.claim_run_dir(tmp_path, None)
    assert first != second and first.is_dir() and second.is_dir()
    ckpt.claim_run_dir(tmp_path, "mine")
    with pytest.raises(ckpt.RunFolderError, match="already exists"):
        ckpt.claim_run_dir(tmp_path, "mine")
    with pytest.raises(ckpt.RunFolderError, match="no run under"):
        ckpt.find_resumable_run(tmp_path / "nothing", None)


def test_latest_moves_atomically_to_a_finished_run(tmp_path):
    a, b = ckpt.claim_run_dir(tmp_path, "a"), ckpt.claim_run_dir(tmp_path, "b")
    ckpt.mark_latest(a)
    assert (tmp_path / "latest").resolve() == a.resolve()
    ckpt.mark_latest(b)
    assert (tmp_path / "latest").resolve() == b.resolve()
    assert os.readlink(tmp_path / "latest") == "b"  # relative: the runs folder can move
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- non-finite loss


@pytest.mark.distributed
def test_nonfinite_loss_stops_the_run_and_no_checkpoint_holds_it(tmp_path, cache):
    fragment = tiny_fragment(tmp_path, cache, steps=30, every=1)
    root = tmp_path / "runs"
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    result = run(fit_args("sft", fragment, "--model.init_args.lr", "1e6", "--model.init_args.warmup_steps", "0",
                          "--trainer.gradient_clip_val", "0", "--trainer.default_root_dir", str(root)), tmp_path,
                 TMPDIR=str(tmpdir))
    assert result.returncode != 0
    assert not list(tmpdir.iterdir())  # checkpoints are written beside their final name, never via $TMPDIR
    message = result.stderr.strip().splitlines()[-1]
    assert "llmstages: sft: non-finite" in message and " at step " in message, message
    step = int(message.split(" at step ")[1].split(";")[0])
    assert 0 < step < 30
    run_dir = _one_run(root / "sft")
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        assert ckpt.first_nonfinite(ckpt.load_checkpoint_file(path)) is None, path
    last = ckpt.load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == step  # the last finite state, saved before the failing step
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert not (root / "sft" / "latest").exists()  # a failed run is never chained from


def test_checkpoint_io_refuses_non_finite_weights(tmp_path):
    io = ckpt.AtomicCheckpointIO()
    with pytest.raises(ckpt.CheckpointError, match="backbone.w is not finite"):
        io.save_checkpoint({"state_dict": {"backbone.w": torch.tensor([1.0, float("nan")])}}, tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_skip_step_skips_non_finite_steps_up_to_the_cap(tmp_path):
    import lightning as L

    from llmstages.callbacks import NonFiniteError, NonFiniteGuard
    from llmstages.data import SFTData
    from llmstages.stages import SFTModule

    class PoisonEveryOther(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step % 2 == 1:
                next(pl_module.parameters()).grad.fill_(float("nan"))

    data = SFTData(cache_dir=str(tmp_path), batch_size=2, seq_len=64)
    model = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0)
    guard = NonFiniteGuard("sft", action="skip_step", max_skipped_steps=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[PoisonEveryOther(), guard])
    with pytest.raises(NonFiniteError, match="on 3 steps"):
        trainer.fit(model, data)
    assert guard.skipped == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- W&B


@pytest.mark.distributed
def test_wandb_with_an_unreachable_server_finishes_offline_quickly_and_resumes_the_same_run(tmp_path, cache):
    fragment = tiny_fragment(tmp_path, cache, steps=2)
    override = yaml.safe_load(fragment.read_text())
    del override["trainer"]["logger"]  # the stage config's W&B logger
    fragment.write_text(yaml.safe_dump(override))
    root = tmp_path / "runs"
    started = time.monotonic()
    result = run(fit_args("sft", fragment, "--trainer.default_root_dir", str(root)), tmp_path, timeout=90,
                 WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{_free_port()}", WANDB_MODE="online")
    seconds = time.monotonic() - started
    ok(result)
    assert "wandb sync" in result.stderr + result.stdout
    run_dir = _one_run(root / "sft")
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    wandb_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]
    assert offline[0].name.endswith(wandb_id)
    assert seconds < 75, seconds
    # resuming continues that W&B run: same id (W&B resume="allow"), same folder
    ok(run(fit_args("sft", fragment, "--trainer.default_root_dir", str(root), "--ckpt_path", "last",
                    "--trainer.max_steps", "3"), tmp_path, timeout=90))
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(wandb_id) for p in attempts)


def test_wandb_that_cannot_start_at_all_falls_back_to_csv(tmp_path, monkeypatch, caplog):
    from llmstages.loggers import WandbAutoLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "wandb").write_text("a file where W&B wants its folder")  # offline W&B cannot write here
    logger = WandbAutoLogger(save_dir=str(tmp_path), offline=True)
    started = time.monotonic()
    logger.log_metrics({"train/loss": 1.5}, step=0)
    assert "logging CSV" in caplog.text
    logger.log_hyperparams({"lr": 0.1})
    logger.finalize("success")
    assert time.monotonic() - started < 15
    rows = list((tmp_path / "csv").glob("version_*/metrics.csv"))
    assert rows and "train/loss" in rows[0].read_text()


@pytest.mark.parametrize("mirror", [True, False])
def test_wandb_failing_mid_run_sends_the_rest_of_the_metrics_to_a_csv(tmp_path, monkeypatch, caplog, mirror):
    import csv

    from llmstages.loggers import WandbAutoLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbAutoLogger(save_dir=str(tmp_path), offline=True, csv_mirror=mirror)
    k, n = 3, 7
    for step in range(k):
        logger.log_metrics({"train/loss": float(step)}, step=step)

    def broken(*args, **kwargs):
        raise ConnectionError("wandb-core went away")

    monkeypatch.setattr(logger.experiment, "log", broken)
    for step in range(k, n):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    logger.finalize("success")
    warnings = [r.getMessage() for r in caplog.records if "W&B log_metrics failed" in r.getMessage()]
    assert len(warnings) == 1 and f"at step {k}" in warnings[0] and "metrics.csv" in warnings[0], warnings
    assert logger.failed_at_step == k
    [path] = tmp_path.glob("csv/version_*/metrics.csv")
    with open(path, newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps == (list(range(n)) if mirror else list(range(k, n)))


# ----------------------------------------------------------------------------- checkpoints


def test_atomic_save_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    ckpt.atomic_save({"step": 1}, path)

    def dies_mid_write(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="No space"):
        ckpt.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint_file(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_a_killed_writers_temporary_is_removed_by_the_next_save(tmp_path):
    stale = tmp_path / f".last.ckpt.tmp-{socket.gethostname()}-999999999"
    stale.write_bytes(b"partial")
    ckpt.atomic_save({"step": 3}, tmp_path / "last.ckpt")
    assert not stale.exists()


def test_a_truncated_checkpoint_names_its_file(tmp_path, cache):
    path = tmp_path / "last.ckpt"
    ckpt.atomic_save({"state_dict": {"backbone.w": torch.zeros(1000)}, "global_step": 1}, path)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ckpt.CheckpointError, match=f"{path}.*truncated"):
        ckpt.load_checkpoint_file(path)
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        ckpt.check_init_from(path)
    fragment = tiny_fragment(tmp_path, cache, steps=2)
    result = run(fit_args("sft", fragment, "--ckpt_path", str(path), "--trainer.default_root_dir", str(tmp_path / "r")),
                 tmp_path, timeout=60)
    assert result.returncode != 0
    assert str(path) in result.stderr and "truncated" in result.stderr
    assert "sft data:" not in result.stderr + result.stdout  # refused before any data was built


@pytest.fixture
def small_tmpfs(tmp_path):
    """A size-limited real filesystem (tmpfs), mounted by root; `mount(size_bytes)` returns its folder."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounted = []

    def mount(size: int, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.distributed
def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_previous_last_checkpoint(tmp_path, cache, small_tmpfs):
    fragment = tiny_fragment(tmp_path, cache, steps=1)
    root = ("--trainer.default_root_dir", str(tmp_path / "runs"))
    ok(run([*fit_args("sft", fragment, *root), "--run_name", "size"], tmp_path))
    size = (tmp_path / "runs" / "sft" / "size" / "checkpoints" / "last.ckpt").stat().st_size
    disk = small_tmpfs(int(size * 1.5))  # room for one checkpoint, not for its replacement beside it
    full = tiny_fragment(tmp_path, cache, steps=4, every=1, extra={"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(disk), "save_last": True, "save_top_k": 0, "every_n_train_steps": 1}}]}})
    result = run([*fit_args("sft", full, *root), "--run_name", "full"], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line == f"llmstages: cannot write checkpoint {disk / 'last.ckpt'}: No space left on device; " \
                   "the previous last.ckpt is unchanged", result.stderr[-3000:]
    assert [p.name for p in disk.iterdir()] == ["last.ckpt"]  # no temporary left
    assert ckpt.load_checkpoint_file(disk / "last.ckpt")["global_step"] == 1
    info = json.loads((tmp_path / "runs" / "sft" / "full" / "run.json").read_text())
    assert info["status"] == "failed" and str(disk / "last.ckpt") in info["error"]


def test_an_unwritable_checkpoint_folder_is_one_error_naming_the_file(small_tmpfs):
    disk = small_tmpfs(1 << 20, read_only=True)  # root may write anywhere, except on a read-only filesystem
    for path in (disk / "last.ckpt", disk / "sub" / "last.ckpt"):
        with pytest.raises(ckpt.CheckpointWriteError, match=f"cannot write checkpoint {path}: Read-only file system; "
                                                            "no last.ckpt was written"):
            ckpt.atomic_save({"step": 1}, path)


@pytest.mark.distributed
def test_ckpt_path_last_reads_an_explicit_dirpath_and_refuses_an_ambiguous_one(tmp_path, cache):
    outside = tmp_path / "elsewhere"
    fragment = tiny_fragment(tmp_path, cache, steps=2, extra={"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(outside), "save_last": True, "every_n_train_steps": 2}}]}})
    root = ("--trainer.default_root_dir", str(tmp_path / "runs"))
    ok(run(fit_args("sft", fragment, *root), tmp_path))
    resumed = run(fit_args("sft", fragment, *root, "--ckpt_path", "last", "--trainer.max_steps", "3"), tmp_path)
    ok(resumed)
    assert ckpt.load_checkpoint_file(outside / "last.ckpt")["global_step"] == 3  # continued from step 2, not 0
    (outside / "last-v1.ckpt").write_bytes((outside / "last.ckpt").read_bytes())
    refused = run(fit_args("sft", fragment, *root, "--ckpt_path", "last", "--trainer.max_steps", "4"), tmp_path)
    assert refused.returncode == 2  # a user error (llmstages.errors): one line, exit 2
    message = refused.stderr.strip()
    assert "ambiguous" in message and str(outside / "last.ckpt") in message and str(outside / "last-v1.ckpt") in message


@pytest.mark.distributed
def test_a_run_failing_before_training_is_recorded_failed_with_its_error(tmp_path, cache):
    fragment = tiny_fragment(tmp_path, cache, steps=2)
    missing = tmp_path / "no-such-model"
    result = run(fit_args("sft", fragment, "--trainer.default_root_dir", str(tmp_path / "runs"),
                          "--model.init_args.init_from", str(missing)), tmp_path, timeout=60)
    assert result.returncode != 0
    run_dir = _one_run(tmp_path / "runs" / "sft")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and str(missing) in info["error"], info
    # the same run continued (nothing saved yet: from scratch, as Lightning's `last`) clears the stale error
    ok(run(fit_args("sft", fragment, "--trainer.default_root_dir", str(tmp_path / "runs"), "--ckpt_path", "last",
                    "--run_name", run_dir.name), tmp_path))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and "error" not in info, info


@pytest.mark.distributed
def test_a_run_killed_early_keeps_every_metric_before_its_resume_point(tmp_path, cache):
    """W&B's offline file of a run killed in its first seconds can be empty; the CSV mirror, flushed at every
    checkpoint, holds every step the resumed run will not log again."""
    wandb = {"trainer": {"logger": {"class_path": "llmstages.loggers.WandbAutoLogger", "init_args": {"offline": True}}}}
    fragment = tiny_fragment(tmp_path, cache, steps=6, every=2, kill_at=2, extra=wandb)
    result = run(fit_args("sft", fragment, "--trainer.default_root_dir", str(tmp_path / "runs")), tmp_path)
    assert result.returncode == -9, result.stderr[-3000:]
    from clirun import step_losses

    logged = step_losses(_one_run(tmp_path / "runs" / "sft"), "train/step_loss")
    assert sorted(logged)[:2] == [0, 1], logged  # steps 0 and 1: the resume point is global step 2


def test_init_from_problems_are_reported_before_any_data_is_built(tmp_path):
    from llmstages.stages import SFTModule

    with pytest.raises(ckpt.CheckpointError, match="no such file"):
        SFTModule(preset="tiny", vocab_size=100, init_from=str(tmp_path / "typo.ckpt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="without config.json"):
        SFTModule(preset="tiny", vocab_size=100, init_from=str(tmp_path / "folder"))
    source = SFTModule(preset="tiny", vocab_size=100, generate_samples=0)
    path = tmp_path / "sft.ckpt"
    ckpt.atomic_save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, path)
    with pytest.raises(ValueError, match="100 tokens, this run's tokenizer 120"):
        SFTModule(preset="tiny", vocab_size=120, init_from=str(path))


def test_a_checkpoint_records_its_full_shape_and_chaining_keeps_it(tmp_path):
    from llmstages.model.config import ModelConfig
    from llmstages.stages import DPOModule, SFTModule

    shape = {**ModelConfig.from_name("tiny").to_dict(), "norm_eps": 1e-3, "vocab_size": 100}
    source = SFTModule(model=shape, generate_samples=0)
    assert source.hparams["model"] == source.config.to_dict()
    path = tmp_path / "sft.ckpt"
    ckpt.atomic_save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, path)
    chained = DPOModule(preset="demo", vocab_size=100, init_from=str(path))  # `preset` must not win
    assert chained.config.to_dict() == source.config.to_dict()


# ----------------------------------------------------------------------------- caches


def test_a_skip_runs_cache_does_not_silence_a_raise_run(tmp_path):
    from llmstages.data import PretrainData
    from llmstages.data.formats import DataFormatError

    corpus = tmp_path / "corpus.jsonl"
    good = [json.dumps({"text": f"document number {i} " * 20}) for i in range(200)]
    corpus.write_text("\n".join([*good[:100], json.dumps({"txt": "wrong field"}), *good[100:]]) + "\n")
    skipping = PretrainData(files=[str(corpus)], on_error="skip", cache_dir=str(tmp_path), seq_len=64)
    skipping.setup("fit")
    assert skipping.skipped
    raising = PretrainData(files=[str(corpus)], on_error="raise", cache_dir=str(tmp_path), seq_len=64)
    with pytest.raises(DataFormatError, match="corpus.jsonl:101"):
        raising.setup("fit")


def test_console_help_is_quiet(tmp_path):
    import subprocess

    from clirun import env

    result = subprocess.run([LLMSTAGES, "fit", "--help"], capture_output=True, text=True, env=env(), timeout=60)
    assert result.returncode == 0
    assert "args parameter" not in result.stderr and "Warning" not in result.stderr, result.stderr[-2000:]
    assert "--run_name" in result.stdout and "--nonfinite" in result.stdout


def test_a_document_encoded_in_pieces_gives_the_ids_of_encoding_it_whole(tmp_path):
    import random

    from llmstages.data.base import default_tokenizer
    from llmstages.data.pretrain import document_pieces, splits_at_spaces

    tok = default_tokenizer(tmp_path)
    assert splits_at_spaces(tok.to_json())
    rng = random.Random(0)
    words = ["alpha", "beta", "  gap", "tab\there", "x\ny", "12.5", "épsilon", "日本語", "'s", " ", "a,b", "<|im_end|>"]
    doc = " ".join(rng.choice(words) for _ in range(20_000))
    pieces = list(document_pieces(doc, 500))
    assert len(pieces) > 100 and "".join(p for p, _ in pieces) == doc and pieces[-1][1]
    ids = [i for piece, _ in pieces for i in tok.encode(piece)]
    assert ids == tok.encode(doc)


@pytest.mark.slow
def test_a_200_mb_record_is_read_and_encoded_in_under_2_gb(tmp_path):
    """Peak RSS of a process that builds the token cache of one 200 MB JSONL record."""
    import random
    import subprocess
    import sys

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "épsilon", "12", "x\ny", "zeta"]
    with open(tmp_path / "huge.jsonl", "w") as f:
        f.write('{"text": "')
        for _ in range(200):
            f.write(" ".join(rng.choice(words) for _ in range(170_000)).replace("\n", "\\n") + " ")
        f.write('"}\n')
    assert (tmp_path / "huge.jsonl").stat().st_size > 200e6
    script = (
        "import resource, sys\n"
        "from llmstages.data import PretrainData\n"
        "d = PretrainData(files=[sys.argv[1]], cache_dir=sys.argv[2], seq_len=128)\n"
        "d.setup('fit')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "huge.jsonl"), str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_mb = int(result.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mb < 2048, peak_mb


def test_stage_configs_name_no_run_paths():
    """`--trainer.default_root_dir` alone relocates a run only if no config pins a path under runs/."""
    from clirun import CONFIGS

    for path in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("fragments/*.yaml")]:
        settings = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        assert not [line for line in settings if "runs/" in line or "dirpath" in line or "save_dir" in line], path


def test_progress_bar_shows_no_negative_epoch_count():
    import lightning as L

    from llmstages.callbacks import StageProgressBar

    bar = StageProgressBar()
    trainer = L.Trainer(max_steps=300, logger=False, enable_checkpointing=False, callbacks=[bar])
    trainer.fit_loop.max_epochs = -1  # what fit sets when only max_steps bounds the run
    bar._trainer = trainer  # what the trainer's set-up does
    assert bar._get_train_description(2).strip() == "Epoch 2 (max 300 steps)"
