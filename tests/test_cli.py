"""The `flaxvision` command end to end, in a subprocess as a user runs it."""

import json

import pytest

import flaxvision
from tests.helpers import flaxvision_cli


def test_models_json_lists_every_model_with_real_counts():
    result = flaxvision_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == flaxvision.list_models()
    for row in rows:
        assert set(row) == {"name", "params", "gflops", "img_size"}
        config = flaxvision.model_config(row["name"])  # the formula equals the built module: test_models, per kind
        assert row["params"] == config.param_count()
        assert row["img_size"] == config.img_size
        assert row["gflops"] > 0
    by_name = {r["name"]: r for r in rows}
    assert by_name["vit_base_patch16_224"]["params"] == 86_567_656
    assert 35.0 < by_name["vit_base_patch16_224"]["gflops"] < 35.3  # 17.6 GMACs, as timm reports


def test_models_table_and_pattern():
    result = flaxvision_cli("models", "resnet*")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["name", "params"]
    assert [line.split()[0] for line in lines[2:]] == ["resnet18", "resnet18_cifar", "resnet34", "resnet50"]
    assert "11.69" in lines[2]


def test_no_match_is_a_one_line_error_with_exit_code_2():
    result = flaxvision_cli("models", "vt_*")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["flaxvision: error: no model matches 'vt_*'; run `flaxvision models` to list them all"]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = flaxvision_cli("models", "vt_*", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "FlaxvisionError" in result.stderr


def test_unknown_subcommand_and_help():
    assert flaxvision_cli("frobnicate").returncode == 2
    help_text = flaxvision_cli("models", "--help")
    assert help_text.returncode == 0 and "examples:" in help_text.stdout


def test_main_turns_library_errors_into_exit_code_2(capsys, monkeypatch):
    from flaxvision import cli
    from flaxvision.commands import models

    def boom(args):
        flaxvision.create_model("vit_bse_patch16_224")

    monkeypatch.setattr(models, "run", boom)
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flaxvision: error: unknown model 'vit_bse_patch16_224'") and "\n" not in err
    with pytest.raises(flaxvision.FlaxvisionError):
        cli.main(["models", "--debug"])
