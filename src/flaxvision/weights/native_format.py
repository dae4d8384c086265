"""flaxvision's own weights format, for every model family (ViT, ResNet, CNN): model.safetensors + config.json.

    config.json        {"format": "flaxvision", "flaxvision_version": ..., "config_class": "ResNetConfig",
                        "config": {...the config dataclass...}, "preprocessing": {...}, "label_names": [...] | null}
    model.safetensors  one float32 tensor per parameter and batch statistic, keyed by its dotted module path
                       ("blocks.0.attn.qkv.kernel", "stages.0.0.bn1.mean"); its header metadata repeats config.json,
                       so the file alone is self-describing.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from typing import Any

from flaxvision.errors import FlaxvisionError
from flaxvision.models.registry import config_classes, default_preprocessing
from flaxvision.preprocessing import Preprocessing
from flaxvision.weights.config_json import check_config_json
from flaxvision.weights.convert import Parsed, copy, param_shapes
from flaxvision.weights.hub import WeightFiles

FORMAT = "flaxvision"
METADATA_KEY = "flaxvision"


def _version() -> str:
    # Installed metadata rather than `flaxvision.__version__`: importing the package from here would be a cycle.
    try:
        return importlib.metadata.version("flaxvision")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


FAMILY = "every family"


def is_native(weights: WeightFiles) -> bool:
    return (weights.config or {}).get("format") == FORMAT or weights.metadata.get("format") == FORMAT


detect = is_native


def exports(config: Any) -> bool:
    return True  # the config itself is stored


def describe(config: Any, preprocessing: Preprocessing, label_names: tuple[str, ...] | None) -> dict[str, Any]:
    """The config.json of a model."""
    return {
        "format": FORMAT,
        "flaxvision_version": _version(),
        "config_class": type(config).__name__,
        "config": dataclasses.asdict(config),
        "preprocessing": preprocessing.to_dict(),
        "label_names": list(label_names) if label_names is not None else None,
    }


def config_from_dict(info: dict[str, Any], what: str) -> Any:
    """Rebuild the config dataclass named in a config.json (lists back to tuples)."""
    name = info.get("config_class")
    known = config_classes()
    if not isinstance(name, str) or name not in known:
        raise FlaxvisionError(f"{what}: config_class {name!r} is unknown; this flaxvision knows {', '.join(known)}")
    cls = known[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    values = info.get("config") or {}
    if not isinstance(values, dict):
        raise FlaxvisionError(f"{what}: config should be a JSON object of {name} fields, got {type(values).__name__}; save it again")
    unknown = sorted(set(values) - fields)
    if unknown:
        raise FlaxvisionError(f"{what}: {name} has no field(s) {', '.join(unknown)}; was it saved by a newer flaxvision?")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def parse(weights: WeightFiles) -> Parsed:
    """Config, identity rules and metadata of flaxvision weights."""
    what = f"flaxvision weights '{weights.origin}'"
    info = weights.config if (weights.config or {}).get("format") == FORMAT else None
    if info is None:
        try:
            info = json.loads(weights.metadata[METADATA_KEY])
        except (KeyError, json.JSONDecodeError):
            raise FlaxvisionError(f"{what}: no config.json and no config in the safetensors header; save it with save_pretrained") from None
        if not isinstance(info, dict):
            raise FlaxvisionError(f"{what}: the config in the safetensors header is not a JSON object; save it with save_pretrained")
        check_config_json(info, weights.files[0])
    config = config_from_dict(info, what)
    try:
        prep = Preprocessing.from_dict(info["preprocessing"]) if info.get("preprocessing") else default_preprocessing(config)
    except TypeError as err:  # a required field (img_size) missing
        raise FlaxvisionError(f"{what}: its preprocessing is incomplete ({err}); save it again with save_pretrained") from None
    labels = info.get("label_names")
    if labels is not None and not all(isinstance(n, str) for n in labels):
        raise FlaxvisionError(f"{what}: label_names should be strings, got {labels[:4]!r}; save it again with save_pretrained")
    return Parsed(
        format=FORMAT,
        tensors=weights.tensors,
        config=config,
        rules=[copy(k, k) for k in param_shapes(config)],
        label_names=tuple(labels) if labels is not None else None,
        preprocessing=prep,
    )
