"""Which module reads and writes which weights: one layout module per (library, family).

A layout module describes one library's file layout of one model family (transformers' ViT, timm's ConvNeXt ...):

    FORMAT                                  "transformers", "timm", "npz" or "flaxvision"
    detect(weights) -> bool                 these files are in this layout (config.json first, else tensor names;
                                            `convert.detect_transformers` / `convert.detect_timm` do both)
    parse(weights) -> Parsed                the architecture, the conversion rules and the metadata
    exports(config) -> bool                 this layout can hold a model with this config
    from_flaxvision(params, config)         flaxvision flat dict -> the library's tensors
    config_files(config, prep, labels)      the library's JSON files {"config.json": {...}, ...}
    refusal(config) -> str | None           (optional) what this layout lacks for a config of its family

Reading tries the modules in `READERS` order (flaxvision's own format first). Writing picks the first module of
the format that `exports` the config. `flaxvision verify` builds the reference from what the writer produces: the
transformers class named in config.json's "architectures", timm's `create_model(architecture, **model_args)`, so
a new layout is verifiable with no code in the command.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import flaxvision.weights.gray_stem as gray_stem
import flaxvision.weights.native_format as native_format
import flaxvision.weights.npz_format as npz_format
import flaxvision.weights.timm_convnext_format as timm_convnext_format
import flaxvision.weights.timm_eva_format as timm_eva_format
import flaxvision.weights.timm_format as timm_format
import flaxvision.weights.timm_resnet_format as timm_resnet_format
import flaxvision.weights.transformers_clip_format as transformers_clip_format
import flaxvision.weights.transformers_convnext_format as transformers_convnext_format
import flaxvision.weights.transformers_deit_format as transformers_deit_format
import flaxvision.weights.transformers_dinov2_format as transformers_dinov2_format
import flaxvision.weights.transformers_format as transformers_format
import flaxvision.weights.transformers_resnet_format as transformers_resnet_format
from flaxvision.errors import FlaxvisionError
from flaxvision.models.registry import name_of
from flaxvision.weights.convert import Parsed
from flaxvision.weights.hub import WeightFiles

# Readers in detection order: a file claimed by config.json's model_type / architecture is never re-read by
# another module from its tensor names. timm_format (VisionTransformer) comes after the other timm layouts: it
# takes every timm architecture they do not.
READERS: tuple[ModuleType, ...] = (
    native_format,
    transformers_format,
    transformers_deit_format,
    transformers_dinov2_format,
    transformers_clip_format,
    transformers_resnet_format,
    transformers_convnext_format,
    timm_resnet_format,
    timm_convnext_format,
    timm_eva_format,
    timm_format,
    npz_format,
)
# Formats in order of preference for a model that fits several (transformers' files load the most widely).
FORMATS = ("transformers", "timm", "npz", "flaxvision")
REFERENCES = ("timm", "transformers")  # what `flaxvision verify` compares with, preferred first


def parse_weights(weights: WeightFiles) -> Parsed:
    """Detect the layout of pretrained weights and read their architecture."""
    for module in READERS:
        if module.detect(weights):
            parsed = module.parse(weights)
            if module.FORMAT == "transformers":  # a 1-channel model's export: its gray stem back (gray_stem)
                parsed = gray_stem.untile(parsed, module.STEM_KERNEL, weights.config, weights.origin)
            return parsed
    model_type = (weights.config or {}).get("model_type")
    if model_type is not None:
        known = ", ".join(repr(t) for m in writers("transformers") for t in m.MODEL_TYPES)
        raise FlaxvisionError(
            f"transformers weights '{weights.origin}': model_type={model_type!r} is not supported; flaxvision reads "
            f"transformers weights of model_type {known}, timm and big_vision weights"
        )
    sample = ", ".join(sorted(weights.tensors)[:4])
    families = ", ".join(f"{fmt} {' / '.join(m.FAMILY for m in writers(fmt))}" for fmt in FORMATS if fmt != "flaxvision")
    raise FlaxvisionError(f"cannot tell the format of '{weights.origin}' (tensors like {sample}); flaxvision reads {families} and its own format")


def writers(fmt: str) -> tuple[ModuleType, ...]:
    return tuple(m for m in READERS if m.FORMAT == fmt)


def writer(fmt: str, config: Any) -> ModuleType:
    """The module that writes `config` in format `fmt`; a FlaxvisionError naming the formats that can."""
    if fmt not in FORMATS:
        raise FlaxvisionError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    for module in writers(fmt):
        if module.exports(config):
            return module
    choices = " or ".join(repr(f) for f in export_formats(config))
    # A layout of the model's family says what it lacks (`refusal`); otherwise the format knows no such family.
    reasons = [r for m in writers(fmt) if hasattr(m, "refusal") and (r := m.refusal(config))]
    why = reasons[0] if reasons else f"format {fmt!r} cannot hold {name_of(config)}"
    raise FlaxvisionError(f"{why}; save it with format={choices}")


def export_formats(config: Any) -> tuple[str, ...]:
    """The formats that can hold `config`, the preferred first; always ends with "flaxvision"."""
    return tuple(f for f in FORMATS if any(m.exports(config) for m in writers(f)))


def verify_references(config: Any) -> tuple[str, ...]:
    """The PyTorch libraries `flaxvision verify` can compare a model with: those whose format holds it."""
    formats = export_formats(config)
    return tuple(r for r in REFERENCES if r in formats)
