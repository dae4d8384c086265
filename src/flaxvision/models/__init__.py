"""Model zoo: ViT, ResNet-18 and the MNIST CNN as Flax NNX modules behind a timm-style registry."""

from flaxvision.models.base import Classifier
from flaxvision.models.cnn import CNN, CNNConfig
from flaxvision.models.registry import (
    abstract_model,
    build_model,
    create_model,
    default_preprocessing,
    get_model_spec,
    list_models,
    model_config,
    model_info,
    register_model,
)
from flaxvision.models.resnet import ResNet, ResNetConfig
from flaxvision.models.vit import ViT, ViTConfig

__all__ = [
    "CNN", "CNNConfig", "Classifier", "ResNet", "ResNetConfig", "ViT", "ViTConfig",
    "abstract_model", "build_model", "create_model", "default_preprocessing", "get_model_spec", "list_models", "model_config",
    "model_info", "register_model",
]  # fmt: skip
