"""Every shell command of the README, run as written (the README is this test's input, so they cannot drift apart).

Each command in a ```bash block is either run, through the real `llmstages` entry point in a fresh folder
holding a `configs` link, or listed in `NOT_RUN` with the reason; a README command that is neither fails
`test_every_readme_command_is_run_or_excused`. Commands run in README order (the later ones read the runs the
earlier ones made: `runs/sft/latest/...`).

What is changed, and nothing else (the substitution table):

| in the README | in the test | why |
|---|---|---|
| `llmstages fit ...` / `llmstages validate ...` | `... --config <scale.yaml>` appended | 2 steps, 1 validation batch (no sanity check), CSV logger, last.ckpt at step 2, the session's tokenizer cache |
| `llmstages masks ...` | `... --data.init_args.cache_dir <cache>` appended | the session's tokenizer cache |
| `/path/to/folder` | a random Llama folder with a tokenizer | no downloads in tests |
| `../shared/` | its absolute path | commands run in a fresh folder, not the repository root |

The default run covers the first stage chain and every tool command (under ~2 minutes); the slow one runs
every runnable command, the reward, DPO, GRPO stages and the resume included.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from clirun import ROOT, ok, run

README = ROOT / "README.md"

NOT_RUN = {  # regex on the command -> why the test does not run it
    r"^make (demo|test)$": "installs a virtual environment and runs the whole demo/suite (CI runs `make test` itself)",
    r"--trainer\.devices G": "multi-GPU / multi-node launch (G devices, N nodes): the distributed tests cover it on 2 CPU processes",
    r"^srun ": "a SLURM job step (a cluster): tests/test_preemption.py runs the requeue path with a stand-in `scontrol`",
    r"^torchrun ": "multi-GPU / multi-node launch: tests/test_distributed.py runs torchrun on 2 CPU processes",
    r"/path/to/Qwen2\.5-0\.5B-Instruct": "needs a downloaded Qwen2.5-0.5B-Instruct; tests/test_recipes.py runs the recipe on a random model of its shape",
    r"^python benchmarks/": "a benchmark (minutes to an hour); tests/test_benchmarks.py runs their --quick modes",
}
DEFAULT = (  # the cheap chain run by default: the commands whose start matches
    "llmstages fit --config configs/pretrain.yaml",
    "llmstages fit --config configs/sft.yaml --model.init_args.init_from",
    "llmstages validate ",
    "llmstages masks ",
    "llmstages generate ",
    "llmstages chat ",
    "llmstages export ",
    "llmstages import ",
)
CHAT_INPUT = "What is 2 + 3?\n/exit\n"


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks: `\\`-continued lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = shlex.join(shlex.split(command, comments=True))
            if command:
                commands.append(command)
    return commands


def _excuse(command: str) -> str | None:
    return next((why for pattern, why in NOT_RUN.items() if re.search(pattern, command)), None)


def _stage(command: list[str]) -> str:
    config = command[command.index("--config") + 1]
    return Path(config).stem


def _scale_fragment(folder: Path, cache: Path, stage: str) -> Path:
    override = {
        "trainer": {
            "max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
            "num_sanity_val_steps": 0, "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_last": True, "every_n_train_steps": 2}}],
            "logger": {"class_path": "llmstages.loggers.CSVLogger"},
        },
        "data": {"init_args": {"cache_dir": str(cache), "batch_size": 4}},
    }
    path = folder / f"scale-{stage}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def _hf_folder(folder: Path, cache: Path) -> Path:
    from llmstages.data.base import default_tokenizer
    from llmstages.model.config import ModelConfig
    from llmstages.model.hf import to_hf
    from llmstages.model.transformer import Transformer

    tokenizer = default_tokenizer(cache)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))
    return to_hf(model, folder / "downloaded-model", tokenizer=tokenizer)


def _run_readme(tmp_path: Path, cache: Path, selected) -> list[str]:
    """Run the selected README commands in order in `tmp_path`; the commands run."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    scale_dir = tmp_path / "scale"
    scale_dir.mkdir()
    done = []
    for command in readme_commands(README.read_text(encoding="utf-8")):
        if _excuse(command) or not selected(command):
            continue
        command = command.replace("/path/to/folder", str(_hf_folder(scale_dir, cache)))
        command = command.replace("../shared/", f"{ROOT.parent / 'shared'}/")
        args = shlex.split(command)
        assert args[0] == "llmstages", command
        args = args[1:]
        stdin = None
        if args[0] in ("fit", "validate"):
            args += ["--config", str(_scale_fragment(scale_dir, cache, _stage(args)))]
        elif args[0] == "masks":
            args += ["--data.init_args.cache_dir", str(cache)]
        elif args[0] == "chat":
            stdin = CHAT_INPUT
        ok(run(args, tmp_path, timeout=240, stdin=stdin))
        done.append(command)
    return done


def test_every_readme_command_is_run_or_excused():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 15, commands
    for command in commands:
        assert command.startswith("llmstages ") or _excuse(command), f"README command neither run nor excused: {command}"


def test_readme_commands_run_as_written(tmp_path, cache):
    done = _run_readme(tmp_path, cache, lambda c: c.startswith(DEFAULT))
    assert [c.split()[1] for c in done] == ["fit", "fit", "validate", "masks", "generate", "chat", "export", "import"]
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "model.ckpt").is_file()
    assert (tmp_path / "masks.html").is_file()


@pytest.mark.slow
def test_every_runnable_readme_command_runs_as_written(tmp_path, cache):
    done = _run_readme(tmp_path, cache, lambda c: True)
    fits = [_stage(shlex.split(c)) for c in done if c.startswith("llmstages fit")]
    # the five stages, the resume, ORPO, KTO and streamed pretraining
    assert sorted(fits) == sorted(["pretrain", "sft", "reward", "dpo", "sft", "grpo", "orpo", "kto", "pretrain_stream"]), fits
