"""Model zoo: ViT, ConvNeXt, ResNet-18/34/50 and the MNIST CNN as Flax NNX modules behind a timm-style registry.

Layers, bottom up: `base` (the `ModelConfig` protocol, `Classifier`) and `registry` (names -> configs -> classes);
the families `vit`, `convnext`, `resnet`, `cnn` (each registers itself); `lora` (LoRA adapters on ViTs); `factory.create_model`,
above the weight loaders.
"""

from flaxvision.models import vit_zoo  # noqa: F401  (registers the DeiT, DINOv2, CLIP, SigLIP names)
from flaxvision.models.base import HEAD_INITS, Classifier, ModelConfig, param_path
from flaxvision.models.cnn import CNN, CNNConfig
from flaxvision.models.convnext import ConvNeXt, ConvNeXtConfig
from flaxvision.models.factory import create_model
from flaxvision.models.lora import apply_lora, lora_spec, merge_lora
from flaxvision.models.registry import (
    abstract_model,
    build_model,
    default_preprocessing,
    get_model_spec,
    list_models,
    model_config,
    model_info,
    register_family,
    register_model,
)
from flaxvision.models.resnet import ResNet, ResNetConfig
from flaxvision.models.vit import ViT, ViTConfig

__all__ = [
    "CNN", "CNNConfig", "Classifier", "ConvNeXt", "ConvNeXtConfig", "HEAD_INITS", "ModelConfig", "ResNet", "ResNetConfig", "ViT", "ViTConfig",
    "abstract_model", "apply_lora", "build_model", "create_model", "default_preprocessing", "get_model_spec", "list_models",
    "lora_spec", "merge_lora", "model_config", "model_info", "param_path", "register_family", "register_model",
]  # fmt: skip
