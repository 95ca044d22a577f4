"""The run plan (`llmstages.run_plan.plan_run`), decided without LightningCLI: which folder a run
writes to, which checkpoint it resumes, what its loggers are given, from config, disk and environment."""

from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from llmstages.loggers import CSVLogger as RunCSVLogger
from llmstages.loggers import WandbAutoLogger
from llmstages.run_plan import (
    RUN_DIR_ENV, LoggerSpec, OnDisk, RunFolderError, RunOnDisk, RunRequest, plan_run, survey,
)

ROOT = "/r"


def _request(**kw) -> RunRequest:
    return RunRequest(**{"stage": "sft", "root": ROOT, "new_run_name": "20260101-000000", "new_wandb_id": "fresh", **kw})


def _run(*last: tuple[str, float], info=None, hpc=()) -> RunOnDisk:
    return RunOnDisk(last=dict(last), hpc=dict(hpc), info=info or {})


def test_a_new_fit_claims_a_start_time_folder_on_rank_0_only():
    plan = plan_run(_request(), OnDisk(), {})
    assert plan.run_dir == Path("/r/sft/20260101-000000") and plan.claim and plan.record and plan.timestamped
    assert not plan_run(_request(run_name="mine"), OnDisk(), {}).timestamped  # a given name is never renamed
    assert plan.ckpt_path is None and plan.checkpoint_dir == plan.run_dir / "checkpoints"
    other = plan_run(_request(rank=1), OnDisk(), {})
    assert not other.claim and not other.record and other.run_dir.name == "pending-rank1"
    named = plan_run(_request(rank=1, run_name="mine"), OnDisk(), {})
    assert named.run_dir == Path("/r/sft/mine") and not named.claim


def test_a_spawned_rank_takes_rank_0s_folder_from_the_environment():
    plan = plan_run(_request(rank=1, ckpt_path=None), OnDisk(), {RUN_DIR_ENV: "/r/sft/chosen"})
    assert plan.run_dir == Path("/r/sft/chosen") and not plan.claim and not plan.record


def test_validate_gets_its_own_prefixed_folder():
    plan = plan_run(_request(subcommand="validate", ckpt_path="/x/a.ckpt"), OnDisk(checkpoint_run="/r/sft/a"), {})
    assert plan.run_dir == Path("/r/sft/validate-20260101-000000") and plan.claim and plan.timestamped


@pytest.mark.parametrize("cls, name", [(CSVLogger, "csv"), (RunCSVLogger, "csv"), (TensorBoardLogger, "tensorboard")])
def test_file_loggers_write_into_the_run_folder_by_type(cls, name):
    plan = plan_run(_request(loggers=(LoggerSpec(cls),)), OnDisk(), {})
    assert plan.loggers[0].save_dir == str(plan.run_dir) and plan.loggers[0].name == name
    assert plan.config_dir == plan.run_dir


def test_a_logger_recognised_by_type_not_by_its_class_name():
    class MetricsToCSVFile(Logger):  # "CSV" in the name, not a CSVLogger
        pass

    class Tracker(WandbLogger):  # a W&B logger whose name says nothing
        pass

    plan = plan_run(_request(run_name="a", loggers=(LoggerSpec(MetricsToCSVFile), LoggerSpec(Tracker, name="exp"))), OnDisk(), {})
    assert plan.loggers[0].name is None and plan.loggers[0].save_dir == "/r/sft/a"
    assert plan.loggers[1].name == "exp/a" and plan.loggers[1].id == "fresh"


def test_an_explicit_save_dir_or_dirpath_is_respected():
    request = _request(loggers=(LoggerSpec(CSVLogger, save_dir="/logs"),), checkpoint_dirs=("/ck", None))
    plan = plan_run(request, OnDisk(), {})
    assert plan.loggers[0].save_dir is None and plan.config_dir is None  # config.yaml goes to the trainer's log_dir
    assert plan.checkpoint_dirs == (Path("/ck"), plan.run_dir / "checkpoints") and plan.checkpoint_dir == Path("/ck")


def test_a_resumed_run_keeps_its_wandb_id_and_a_configured_id_wins():
    on_disk = OnDisk(runs={"a": _run(("/r/sft/a/checkpoints/last.ckpt", 5.0), info={"wandb_id": "kept"})})
    plan = plan_run(_request(ckpt_path="last", loggers=(LoggerSpec(WandbAutoLogger),)), on_disk, {})
    assert plan.run_dir == Path("/r/sft/a") and not plan.claim and plan.wandb_id == "kept"
    configured = plan_run(_request(ckpt_path="last", loggers=(LoggerSpec(WandbAutoLogger, id="given"),)), on_disk, {})
    assert configured.wandb_id == "given"


def test_moving_a_plan_moves_every_derived_path():
    plan = plan_run(_request(loggers=(LoggerSpec(CSVLogger),), checkpoint_dirs=(None,)), OnDisk(), {})
    moved = plan.moved_to(Path("/r/sft/20260101-000000-2"))
    assert moved.checkpoint_dir == Path("/r/sft/20260101-000000-2/checkpoints")
    assert moved.loggers[0].save_dir == "/r/sft/20260101-000000-2"


# ----------------------------------------------------------------------------- ckpt_path, as Lightning means it


def test_last_continues_the_named_run_else_the_run_with_the_newest_last_checkpoint():
    on_disk = OnDisk(runs={
        "old": _run(("/r/sft/old/checkpoints/last.ckpt", 1.0)),
        "new": _run(("/r/sft/new/checkpoints/last.ckpt", 9.0)),
        "none": _run(),
    })
    assert plan_run(_request(ckpt_path="last"), on_disk, {}).ckpt_path == "/r/sft/new/checkpoints/last.ckpt"
    named = plan_run(_request(ckpt_path="last", run_name="old"), on_disk, {})
    assert named.run_dir == Path("/r/sft/old") and named.ckpt_path == "/r/sft/old/checkpoints/last.ckpt"


def test_last_with_an_explicit_dirpath_is_that_folders_last_checkpoint():
    on_disk = OnDisk(explicit_last={"/ck": {"/ck/last.ckpt": 3.0}}, dir_runs={"/ck": None},
                     runs={"a": _run(("/r/sft/a/checkpoints/last.ckpt", 9.0))})
    plan = plan_run(_request(ckpt_path="last", checkpoint_dirs=("/ck",)), on_disk, {})
    assert plan.ckpt_path == "/ck/last.ckpt"  # not the run folder's, though it is newer
    assert plan.claim and plan.run_dir.name == "20260101-000000"  # a folder outside any run: a new run
    inside = OnDisk(explicit_last={"/r/sft/a/ck": {"/r/sft/a/ck/last.ckpt": 3.0}}, dir_runs={"/r/sft/a/ck": "/r/sft/a"},
                    runs={"a": _run()})
    plan = plan_run(_request(ckpt_path="last", checkpoint_dirs=("/r/sft/a/ck",)), inside, {})
    assert plan.run_dir == Path("/r/sft/a") and not plan.claim


def test_last_with_several_candidates_is_an_error_listing_them():
    on_disk = OnDisk(runs={"a": _run(("/r/sft/a/checkpoints/last.ckpt", 1.0), ("/r/sft/a/checkpoints/last-v1.ckpt", 2.0))})
    with pytest.raises(RunFolderError, match="ambiguous") as err:
        plan_run(_request(ckpt_path="last"), on_disk, {})
    assert "last.ckpt" in str(err.value) and "last-v1.ckpt" in str(err.value)
    two_dirs = OnDisk(explicit_last={"/x": {"/x/last.ckpt": 1.0}, "/y": {"/y/last.ckpt": 2.0}})
    with pytest.raises(RunFolderError, match="/x/last.ckpt"):
        plan_run(_request(ckpt_path="last", checkpoint_dirs=("/x", "/y")), two_dirs, {})


def test_last_with_nothing_saved_yet_starts_from_scratch_with_a_warning():
    plan = plan_run(_request(ckpt_path="last", run_name="job7"), OnDisk(), {})
    assert plan.ckpt_path is None and plan.run_dir == Path("/r/sft/job7") and plan.claim
    assert "starts from scratch" in plan.warnings[0]
    again = plan_run(_request(ckpt_path="last", run_name="job7"), OnDisk(runs={"job7": _run()}), {})
    assert again.run_dir == Path("/r/sft/job7") and not again.claim  # its own folder, continued


def test_hpc_is_the_highest_numbered_hpc_checkpoint_of_the_run():
    on_disk = OnDisk(runs={"a": _run(hpc=(("/r/sft/a/hpc_ckpt_2.ckpt", 9.0), ("/r/sft/a/hpc_ckpt_10.ckpt", 1.0)))})
    plan = plan_run(_request(ckpt_path="hpc"), on_disk, {})
    assert plan.ckpt_path == "/r/sft/a/hpc_ckpt_10.ckpt" and plan.run_dir == Path("/r/sft/a")
    with pytest.raises(RunFolderError, match="hpc_ckpt"):
        plan_run(_request(ckpt_path="hpc"), OnDisk(), {})


def test_a_runs_own_checkpoint_continues_that_run():
    plan = plan_run(_request(ckpt_path="/r/sft/a/checkpoints/x.ckpt"), OnDisk(checkpoint_run="/r/sft/a"), {})
    assert plan.run_dir == Path("/r/sft/a") and not plan.claim


def test_a_requeued_slurm_job_continues_its_unfinished_run():
    runs = {
        "mine": _run(("/r/sft/mine/checkpoints/last.ckpt", 5.0), info={"slurm_job_id": "77", "status": "preempted"}),
        "done": _run(("/r/sft/done/checkpoints/last.ckpt", 9.0), info={"slurm_job_id": "77", "status": "finished"}),
        "other": _run(("/r/sft/other/checkpoints/last.ckpt", 9.0), info={"slurm_job_id": "12", "status": "preempted"}),
    }
    env = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}
    plan = plan_run(_request(), OnDisk(runs=runs), env)
    assert plan.run_dir == Path("/r/sft/mine") and plan.ckpt_path == "/r/sft/mine/checkpoints/last.ckpt"
    first = plan_run(_request(), OnDisk(runs=runs), {"SLURM_JOB_ID": "77"})  # not requeued: a new run
    assert first.claim and first.ckpt_path is None


def test_survey_reads_run_folders_and_explicit_dirpaths(tmp_path):
    (tmp_path / "sft" / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "sft" / "a" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "sft" / "a" / "checkpoints" / "epoch=0-step=3.ckpt").write_bytes(b"x")
    (tmp_path / "sft" / "a" / "run.json").write_text('{"wandb_id": "w"}')
    (tmp_path / "sft" / "latest").symlink_to("a")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "last-v1.ckpt").write_bytes(b"x")
    request = _request(root=str(tmp_path), checkpoint_dirs=(str(tmp_path / "ck"), None))
    on_disk = survey(request, str(tmp_path / "sft" / "a" / "checkpoints" / "epoch=0-step=3.ckpt"))
    assert set(on_disk.runs) == {"a"} and list(on_disk.runs["a"].last) == [str(tmp_path / "sft/a/checkpoints/last.ckpt")]
    assert on_disk.runs["a"].info == {"wandb_id": "w"}
    assert list(on_disk.explicit_last[str(tmp_path / "ck")]) == [str(tmp_path / "ck" / "last-v1.ckpt")]
    assert on_disk.checkpoint_run == str((tmp_path / "sft" / "a").resolve())
