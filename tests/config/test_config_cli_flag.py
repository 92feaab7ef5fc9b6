"""`vpmoe config validate|show` take the config positionally or as --config, like train, launch and plan."""

from megatron_vpmoe.cli import main

TINY = "examples/configs/tiny-cpu.yaml"


def test_validate_accepts_positional_and_flag(capsys):
    assert main(["config", "validate", TINY]) == 0
    assert main(["config", "validate", "--config", TINY]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{TINY}: ok", f"{TINY}: ok"]


def test_show_accepts_the_flag(capsys):
    assert main(["config", "show", "--config", TINY, "--set", "train.steps=321"]) == 0
    assert "steps: 321" in capsys.readouterr().out


def test_missing_or_conflicting_config_is_one_line(capsys, tmp_path):
    assert main(["config", "validate"]) == 2
    assert "pass CONFIG or --config CONFIG" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    assert main(["config", "validate", TINY, "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert "two configs given" in err and err.count("\n") == 1
