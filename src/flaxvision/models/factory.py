"""`create_model`: a model by its zoo name, with fresh or pretrained weights (timm's `create_model`).

Layering: this module sits above the registry (names -> configs -> modules) and the weight loaders
(`flaxvision.weights.loader`); neither of those imports it.

    >>> model = flaxvision.create_model("vit_base_patch16_224", num_classes=20)
    >>> model = flaxvision.create_model("vit_base_patch16_224", pretrained="google/vit-base-patch16-224", num_classes=20)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flaxvision.errors import FlaxvisionError
from flaxvision.models.base import Classifier
from flaxvision.models.registry import build_model, model_config, named_preprocessing
from flaxvision.weights.loader import load_pretrained


def create_model(
    name: str | None,
    *,
    pretrained: str | Path | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    dtype: Any = None,
    seed: int = 0,
    **overrides: Any,
) -> Classifier:
    """Build a registered model with fresh weights, or from pretrained weights.

    Args:
      name: a name from `list_models()`, e.g. "vit_base_patch16_224"; with `pretrained`, the weights must
        have this architecture, and None accepts whatever they hold.
      pretrained: pretrained weights (Hub repo id, directory, .safetensors or .npz file) loaded by
        `flaxvision.load_pretrained`, which also takes the Hub/pickle options as **overrides.
      num_classes, img_size, in_chans: replace the registered defaults (None keeps them, or the weights').
      dtype: compute dtype ("float32", "bfloat16", or a jnp dtype); parameters stay float32.
      seed: seeds parameter initialisation (and dropout's stream seed + 1).
      **overrides: any other config field, e.g. drop_path_rate=0.1, depth=6.

    Example: `create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4)`,
    `create_model("vit_base_patch16_224", pretrained="google/vit-base-patch16-224", num_classes=20)`.
    """
    if pretrained is not None:
        if in_chans is not None:
            overrides["in_chans"] = in_chans
        return load_pretrained(  # type: ignore[return-value]
            pretrained, name=name, num_classes=num_classes, img_size=img_size, dtype=dtype, seed=seed, **overrides
        )
    if name is None:
        raise FlaxvisionError("create_model needs a model name, or pretrained= to build what the weights hold")
    config = model_config(name, num_classes=num_classes, img_size=img_size, in_chans=in_chans, dtype=dtype, **overrides)
    return build_model(config, seed=seed, preprocessing=named_preprocessing(name, config))
