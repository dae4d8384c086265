"""Presets resolve, take command-line overrides, and run two steps on stand-in data of their shape."""

import argparse
import dataclasses
import json

import numpy as np
import pytest

import flaxvision
from flaxvision.commands import train as train_command
from flaxvision.presets import DEFAULT_PRESET, get_preset, list_presets, preset_module
from flaxvision.train import TrainConfig, fit
from tests.helpers import flaxvision_cli


def parse_train(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_command.add_parser(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def test_every_preset_documents_command_and_expected_result():
    assert DEFAULT_PRESET in list_presets()
    for name in list_presets():
        module = preset_module(name)
        assert isinstance(module.PRESET, TrainConfig)
        assert module.DESCRIPTION and module.EXPECTED
        command = "flaxvision train" if name == DEFAULT_PRESET else f"flaxvision train --preset {name}"
        assert module.__doc__ is not None and command in module.__doc__, name


def test_source_recipes_are_what_the_sources_report():
    sgd = get_preset("food101-vit-b16-sgd")
    assert (sgd.model, sgd.pretrained, sgd.classes, sgd.batch_size, sgd.global_eval_batch_size, sgd.epochs) == (
        "vit_base_patch16_224", "google/vit-base-patch16-224", "20", 32, 64, 3)
    assert (sgd.optimizer, sgd.lr, sgd.momentum, sgd.nesterov, sgd.schedule, sgd.end_lr) == ("sgd", 1e-3, 0.8, True, "linear", 0.0)
    assert (sgd.rrc_scale_min, sgd.color_jitter) == (0.7, 0.2)
    adamw = get_preset("food101-vit-b16-adamw")
    assert (adamw.batch_size, adamw.global_eval_batch_size, adamw.epochs, adamw.lr, adamw.weight_decay, adamw.warmup_steps) == (
        64, 128, 10, 3e-5, 0.05, 500)
    mnist = get_preset("mnist-cnn")
    assert (mnist.model, mnist.batch_size, mnist.epochs, mnist.optimizer, mnist.lr, mnist.b1) == ("cnn", 32, 10, "adamw", 0.005, 0.9)
    lora = get_preset("food101-vit-b16-lora")  # HF PEFT's image-classification LoRA guide
    assert (lora.lora_rank, lora.lora_alpha, lora.lora_targets, lora.lora_dropout) == (16, 16.0, "q,v", 0.1)
    assert (lora.lr, lora.batch_size, lora.accumulate_steps, lora.epochs, lora.weight_decay) == (5e-3, 512, 4, 5, 0.0)
    deit = get_preset("digits-vit-deit")  # DeiT's regularisers (Touvron et al. 2021)
    assert (deit.optimizer, deit.weight_decay, deit.schedule, deit.label_smoothing) == ("adamw", 0.05, "cosine", 0.1)
    assert (deit.mixup, deit.cutmix, deit.mixup_switch_prob, deit.reprob) == (0.8, 1.0, 0.5, 0.25)
    assert deit.randaugment == "rand-m9-mstd0.5-inc1" and deit.ema_decay and deit.model_overrides["drop_path_rate"] == 0.1
    cifar = get_preset("cifar10-resnet18")
    assert (cifar.model, cifar.augment, cifar.batch_size, cifar.epochs, cifar.lr) == ("resnet18_cifar", "cifar", 512, 3, 0.005)


def test_command_line_overrides_every_field():
    name, config = train_command.resolve_config(
        parse_train("--preset", "food101-vit-b16-sgd", "--epochs", "1", "--lr", "3e-4", "--no-nesterov",
                    "--classes", "none", "--model-overrides", '{"drop_path_rate": 0.1}', "--clip-grad-norm", "1")
    )  # fmt: skip
    assert name == "food101-vit-b16-sgd"
    assert (config.epochs, config.lr, config.nesterov, config.classes) == (1, 3e-4, False, None)
    assert config.model_overrides == {"drop_path_rate": 0.1} and config.clip_grad_norm == 1.0
    assert config.batch_size == 32  # untouched fields keep the preset's value
    _, default = train_command.resolve_config(parse_train())
    assert default == get_preset(DEFAULT_PRESET)


def test_from_config_reruns_a_recorded_recipe(tmp_path):
    recorded = dataclasses.replace(get_preset("mnist-cnn"), epochs=2)
    (tmp_path / "config.json").write_text(json.dumps({"train_config": recorded.to_dict()}))
    _, config = train_command.resolve_config(parse_train("--from-config", str(tmp_path / "config.json"), "--lr", "0.001"))
    assert config == dataclasses.replace(recorded, lr=0.001)


def _stand_in(config: TrainConfig, model, n: int) -> list[dict]:
    size, chans = model.config.img_size, model.config.in_chans
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, size, size, chans)).astype(np.uint8)
    labels = rng.integers(0, model.config.num_classes, n).astype(np.int32)
    return [{"image": images[i : i + config.batch_size], "label": labels[i : i + config.batch_size]} for i in range(0, n, config.batch_size)]


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_runs_two_steps_on_stand_in_data(name, tmp_path):
    preset = get_preset(name)
    # Same recipe with a small batch; a tiny model of the same family (no download, CPU-sized).
    config = preset.replace(epochs=1, batch_size=8, eval_batch_size=8, log_every=1, pretrained=None, report=False,
                            progress=False, warmup_steps=min(preset.warmup_steps, 1), accumulate_steps=1)  # fmt: skip
    overrides = {"vit": dict(img_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
                 "resnet": dict(stage_widths=(8, 8, 8, 8), stage_depths=(1, 1, 1, 1)), "cnn": {}}  # fmt: skip
    assert preset.model is not None, name
    family = flaxvision.model_config(preset.model).__class__.__name__.replace("Config", "").lower()
    model = flaxvision.create_model(preset.model, num_classes=20 if "food" in name else 10, **overrides[family])
    data = _stand_in(config, model, 16)
    result = fit(config, run_dir=tmp_path, model=model, train_data=data, val_data=data[:1])
    assert result.summary["steps"] == 2
    assert np.isfinite(result.summary["final_val_loss"])


def test_presets_command_and_unknown_preset():
    result = flaxvision_cli("presets", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list_presets()
    assert {"name", "description", "expected", "command"} <= set(rows[0])
    assert next(r for r in rows if r["name"] == "food101-vit-b16-adamw")["expected"].startswith("92.79%")
    bad = flaxvision_cli("train", "--preset", "food101-vit-b16-sdg")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "flaxvision: error: unknown preset 'food101-vit-b16-sdg' (did you mean food101-vit-b16-sgd, "
        "food101-vit-b16-adamw, food101-vit-b16-lora?); `flaxvision presets` lists them"
    )
