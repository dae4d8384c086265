"""Presets: one small file per recipe. Its docstring gives the command and the result the source reports.

Each module defines PRESET (a TrainConfig), DESCRIPTION and EXPECTED.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from flaxvision.errors import FlaxvisionError, did_you_mean
from flaxvision.train.config import TrainConfig

DEFAULT_PRESET = "digits-vit"  # `flaxvision train` with no arguments: offline, minutes on a CPU

_MODULES = {
    "digits-vit": "digits_vit",
    "food101-vit-b16-sgd": "food101_vit_b16_sgd",
    "food101-vit-b16-adamw": "food101_vit_b16_adamw",
    "mnist-cnn": "mnist_cnn",
    "cifar10-resnet18": "cifar10_resnet18",
    "digits-vit-deit": "digits_vit_deit",
    "food101-vit-b16-lora": "food101_vit_b16_lora",
}


def list_presets() -> list[str]:
    return list(_MODULES)


def preset_module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise FlaxvisionError(f"unknown preset {name!r}{did_you_mean(name, _MODULES)}; `flaxvision presets` lists them")
    return importlib.import_module(f"flaxvision.presets.{_MODULES[name]}")


def get_preset(name: str) -> TrainConfig:
    return preset_module(name).PRESET
