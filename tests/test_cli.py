"""The `llmstages` command: LightningCLI runs, W&B config logging, reruns, tool commands."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from llmstages.cli import main
from llmstages.trainer_cli import lightning_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _fit(tmp_path: Path, cache: Path, logger: str = "wandb", extra: tuple[str, ...] = ()):
    """A two-step SFT fit through the CLI, everything written under tmp_path."""
    override = {
        "trainer": {
            "max_steps": 2,
            "val_check_interval": 2,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True}},
            ],
            "logger": (
                {"class_path": "llmstages.loggers.WandbAutoLogger", "init_args": {"save_dir": str(tmp_path), "offline": True}}
                if logger == "wandb"
                else {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}
            ),
        },
        "model": {"init_args": {"preset": "tiny", "generate_samples": 2, "max_new_tokens": 4}},
        "data": {"init_args": {"cache_dir": str(cache), "batch_size": 4, "seq_len": 128}},
    }
    fragment = tmp_path / "override.yaml"
    fragment.write_text(yaml.safe_dump(override))
    cli = lightning_cli(["fit", "--config", str(CONFIGS / "sft.yaml"), "--config", str(fragment), *extra])
    import wandb

    cli.wandb_config = None
    if wandb.run is not None:
        cli.wandb_config = dict(wandb.run.config)
        wandb.finish()
    return cli


def _wandb_records(run_dir: Path, expected: bytes, seconds: float = 20.0) -> bytes:
    """The offline run's record file; W&B's writer process may still be flushing it just after
    `wandb.finish()` on a loaded machine, so wait (bounded) for `expected` to land."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        record = next(run_dir.glob("*.wandb")).read_bytes()
        if expected in record or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_fit_links_vocab_and_sends_resolved_config_to_wandb(tmp_path, cache):
    cli = _fit(tmp_path, cache)
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size  # linked from the tokenizer
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"]["init_args"]["loss_mask"] == "assistant"
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the resolved config (data and trainer sections, not only the module's hparams) reached the
    # W&B run: its records are in the offline run file, waiting for `wandb sync`
    record = _wandb_records(runs[0], b'"loss_mask":"assistant"')
    assert b'"loss_mask":"assistant"' in record
    assert b'"max_steps":2' in record
    assert cli.wandb_config["data"]["init_args"]["template"] == "chatml"


def test_rerun_in_same_folder_keeps_first_config(tmp_path, cache):
    """Lightning #11256: with W&B, both runs save into one folder; the second must neither crash nor overwrite."""
    _fit(tmp_path, cache)
    first = (tmp_path / "config.yaml").read_text()
    _fit(tmp_path, cache, extra=("--model.init_args.lr", "0.000123"))
    assert (tmp_path / "config.yaml").read_text() == first  # nothing already written is lost
    second = yaml.safe_load((tmp_path / "config-1.yaml").read_text())
    assert second["model"]["init_args"]["lr"] == 0.000123
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2


def test_resume_from_last_checkpoint_continues_step_count(tmp_path, cache):
    _fit(tmp_path, cache, logger="csv")
    cli = _fit(tmp_path, cache, logger="csv", extra=(
        "--trainer.max_steps", "4", "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"),
    ))
    assert cli.trainer.global_step == 4
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4


def test_masks_command_prints_and_writes_html(tmp_path, cache, capsys):
    config = tmp_path / "sft.yaml"
    base = yaml.safe_load((CONFIGS / "sft.yaml").read_text())
    base["data"]["init_args"].update(cache_dir=str(cache), seq_len=128)
    config.write_text(yaml.safe_dump(base))
    html = tmp_path / "masks.html"
    main(["masks", "--config", str(config), "-n", "2", "--html", str(html)])
    out = capsys.readouterr().out
    assert "target tokens of" in out
    page = html.read_text()
    assert "<html" in page.lower() and "im_end" in page


def test_tokenizer_train_command(tmp_path, shared_data):
    out = tmp_path / "tok"
    main(["tokenizer", "train", "--files", str(shared_data / "tinyshakespeare" / "input.txt"),
          "--vocab-size", "400", "--out", str(out)])
    from llmstages.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(out)
    assert tok.vocab_size == 400
    text = "ROMEO:\nBut soft, what light"
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_train_missing_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--files", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t")])
    assert "no such file" in capsys.readouterr().err


def test_export_command_writes_a_transformers_folder(tmp_path, cache):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    cli = _fit(tmp_path, cache, logger="csv")
    out = tmp_path / "hf"
    main(["export", "--ckpt", str(tmp_path / "checkpoints" / "last.ckpt"), "--out", str(out)])
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, cli.model.config.vocab_size, (1, 12))
    with torch.no_grad():
        ours = cli.model.backbone.eval()(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # no --tokenizer: the run's own tokenizer and template, recorded in the checkpoint, make it chat-ready
    from transformers import AutoTokenizer

    from llmstages.data.chat import ChatTemplate

    tokenizer = cli.datamodule.tokenizer
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    messages = [{"role": "user", "content": "add 2 and 3"}]
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    rendered = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
    assert list(rendered) == ChatTemplate.get("chatml").encode_prompt(messages, tokenizer)


def test_generate_from_a_trained_checkpoint_finds_its_tokenizer_and_template(tmp_path, cache, capsys):
    """The README's `llmstages generate --model runs/sft/.../last.ckpt --prompt ...`: nothing else to pass."""
    _fit(tmp_path, cache, logger="csv")
    capsys.readouterr()
    main(["generate", "--model", str(tmp_path / "checkpoints" / "last.ckpt"), "--prompt", "add 2 and 3",
          "--max-new-tokens", "4", "--jsonl"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and isinstance(rows[0]["reply"], str) and isinstance(rows[0]["stopped"], bool)
