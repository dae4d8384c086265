"""flaxvision: build, import, fine-tune, evaluate and ship image classifiers with JAX and Flax NNX.

    >>> import flaxvision
    >>> model = flaxvision.create_model("vit_base_patch16_224", num_classes=20)
    >>> flaxvision.list_models("vit_*")
    >>> model = flaxvision.load_pretrained("google/vit-base-patch16-224", num_classes=20)
    >>> flaxvision.save_pretrained(model, "out/vit-food20", format="transformers")
"""

from flaxvision.errors import ConfigError, FlaxvisionError
from flaxvision.preprocessing import Preprocessing
from flaxvision import data  # the input pipeline: flaxvision.data.load, flaxvision.data.make_loader
from flaxvision.models import (
    CNN,
    CNNConfig,
    Classifier,
    ResNet,
    ResNetConfig,
    ViT,
    ViTConfig,
    build_model,
    create_model,
    list_models,
    model_config,
    model_info,
    register_model,
)
from flaxvision.weights import LoadReport, load_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "CNN", "CNNConfig", "Classifier", "ConfigError", "FlaxvisionError", "Preprocessing", "ResNet", "ResNetConfig", "ViT",
    "ViTConfig", "build_model", "create_model", "list_models", "model_config", "model_info", "register_model",
    "LoadReport", "load_pretrained", "save_pretrained",
]  # fmt: skip

_SUBPACKAGES = ("data", "presets", "report", "train")


def __getattr__(name: str):
    """`flaxvision.data`, `.train`, `.presets`, `.report` load on first use (they pull in datasets, grain, orbax)."""
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"flaxvision.{name}")
    raise AttributeError(f"module 'flaxvision' has no attribute {name!r}")
