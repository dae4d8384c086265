"""Preprocessing metadata: how images become model inputs. It travels with the weights.

A model built from scratch gets its registry default; a pretrained model gets what its checkpoint says
(transformers' preprocessor_config.json, timm's pretrained_cfg). The data pipeline, `evaluate` and `predict` use
`model.preprocessing` unless told otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flaxvision.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's training statistics (timm's OPENAI_CLIP_MEAN/STD)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # google/vit-* checkpoints and the ViT tutorial: pixels in [-1, 1]
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
RESIZE_MODES = ("squash", "shortest")


@dataclasses.dataclass(frozen=True, slots=True)
class Preprocessing:
    """Eval-time geometry and normalisation of a model's inputs.

    Attributes:
      img_size: side of the square model input.
      mean, std: per-channel normalisation of pixels scaled to [0, 1]: (x / 255 - mean) / std.
      crop_pct: eval images are resized so that a centre crop of img_size is `crop_pct` of the resized side
        (timm's convention: 0.875 resizes 224-crops to 256); 1.0 means no cropping.
      resize_mode: "squash" resizes both sides to img_size / crop_pct (transformers' ViTImageProcessor);
        "shortest" resizes the shorter side and keeps the aspect ratio (timm, torchvision).
      interpolation: resampling filter for resizing.
    """

    img_size: int
    mean: tuple[float, ...] = HALF
    std: tuple[float, ...] = HALF
    crop_pct: float = 1.0
    resize_mode: str = "squash"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError(f"Preprocessing: mean {self.mean} and std {self.std} must have one value per channel")
        if min(self.std) <= 0:
            raise ConfigError(f"Preprocessing: std must be positive, got {self.std}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"Preprocessing: crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"Preprocessing: resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"Preprocessing: interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )

    @property
    def channels(self) -> int:
        return len(self.mean)

    def for_channels(self, in_chans: int) -> Preprocessing:
        """The same preprocessing for a model with `in_chans` channels (1-channel: the mean of the RGB values)."""
        if in_chans == self.channels:
            return self
        if in_chans == 1:
            mean, std = (sum(self.mean) / len(self.mean),), (sum(self.std) / len(self.std),)
        elif self.channels == 1:
            mean, std = self.mean * in_chans, self.std * in_chans
        else:
            raise ConfigError(f"cannot adapt {self.channels}-channel normalisation to {in_chans} channels; pass mean/std")
        return dataclasses.replace(self, mean=mean, std=std)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"Preprocessing: unknown field(s) {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {k: tuple(v) if k in ("mean", "std") else v for k, v in data.items()}
        return cls(**values)
