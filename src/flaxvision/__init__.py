"""flaxvision: build, import, fine-tune, evaluate and ship image classifiers with JAX and Flax NNX.

    >>> import flaxvision
    >>> model = flaxvision.create_model("vit_base_patch16_224", num_classes=20)
    >>> flaxvision.list_models("vit_*")
    >>> model = flaxvision.load_pretrained("google/vit-base-patch16-224", num_classes=20)
    >>> flaxvision.save_pretrained(model, "out/vit-food20", format="transformers")
"""

from flaxvision import data  # the input pipeline: flaxvision.data.load, flaxvision.data.make_loader
from flaxvision.errors import (
    ConfigError,
    FlaxvisionError,
    PeerProcessLost,
    RunStopped,
    TrainingDiverged,
    TrainingInterrupted,
)
from flaxvision.models import (
    CNN,
    Classifier,
    CNNConfig,
    ResNet,
    ResNetConfig,
    ViT,
    ViTConfig,
    apply_lora,
    build_model,
    create_model,
    list_models,
    merge_lora,
    model_config,
    model_info,
    register_model,
)
from flaxvision.preprocessing import Preprocessing
from flaxvision.weights import LoadReport, load_adapter, load_pretrained, save_adapter, save_pretrained

__version__ = "0.1.0"

# The public API: these names, and those of flaxvision.data, flaxvision.train, flaxvision.presets and
# flaxvision.report. Everything else is implementation and may change.
__all__ = [
    "CNN", "CNNConfig", "Classifier", "ConfigError", "FlaxvisionError", "PeerProcessLost", "Preprocessing", "ResNet",
    "ResNetConfig", "RunStopped", "TrainingDiverged", "TrainingInterrupted", "ViT", "ViTConfig", "build_model",
    "create_model", "data", "list_models", "model_config", "model_info", "register_model", "LoadReport",
    "load_pretrained", "save_pretrained", "apply_lora", "merge_lora", "load_adapter", "save_adapter",
]  # fmt: skip

_SUBPACKAGES = ("data", "presets", "report", "train")


def __getattr__(name: str):
    """`flaxvision.data`, `.train`, `.presets`, `.report` load on first use (they pull in datasets, grain, orbax)."""
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"flaxvision.{name}")
    raise AttributeError(f"module 'flaxvision' has no attribute {name!r}")
