"""configs/kto.yaml and configs/orpo.yaml parse into their stage and data, and `--model.help` lists every value."""

from pathlib import Path

import pytest

from llmstages.data import KTOData, PreferenceData
from llmstages.options import KLReference, ORPONLLScope, choices
from llmstages.stages import KTOModule, ORPOModule
from llmstages.trainer_cli import lightning_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name,stage,data", [("kto", KTOModule, KTOData), ("orpo", ORPOModule, PreferenceData)])
def test_config_builds_its_stage_and_data(name, stage, data, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(["--config", str(CONFIGS / f"{name}.yaml"), "--model.init_args.preset", "tiny",
                         "--data.init_args.cache_dir", cache_dir, "--trainer.logger", "false"], run=False)
    assert type(cli.model) is stage and type(cli.datamodule) is data


@pytest.mark.parametrize("stage,option,values", [("KTOModule", "kl_reference", choices(KLReference)),
                                                 ("ORPOModule", "nll_scope", choices(ORPONLLScope))])
def test_model_help_lists_every_value(stage, option, values, capsys):
    with pytest.raises(SystemExit):
        lightning_cli(["--model.help", stage], run=False)
    assert f"--model.{option} {{{','.join(values)}}}" in capsys.readouterr().out
