"""LoRA adapters on disk: `save_adapter` writes one on its own, `load_adapter` puts it back onto its base.

    >>> save_adapter(model, "out/adapter", base="google/vit-base-patch16-224")   # model: from apply_lora + training
    >>> model = load_adapter("runs/food-lora/adapter")                  # base: the one named in adapter_config.json
    >>> model = load_adapter("runs/food-lora/adapter", base="./vit-b16")  # or another source of the same weights
    >>> plain = merge_lora(model)                                       # for save_pretrained in any format

    adapter/
      adapter_config.json        {"format": "flaxvision-lora", "flaxvision_version": ..., "base_model": the Hub id or
                                 path of the base weights ("none": trained from scratch), "base_sha256": fingerprint
                                 of the frozen base weights, "model_name": "vit_base_patch16_224" (null when not a
                                 registered architecture), "config_class": "ViTConfig", "config": {...} (the trained
                                 model's: num_classes, img_size ...), "lora": {"rank", "alpha", "targets", "dropout"},
                                 "trained": ["lora", "head"], "label_names": [...] | null, "preprocessing": {...}}
      adapter_model.safetensors  float32, by flaxvision path: every LoRA A/B ("blocks.0.attn.qkv.lora_q.lora_a" (D, r),
                                 "blocks.0.attn.qkv.lora_q.lora_b" (r, D), ...) and the trained head ("head.kernel",
                                 "head.bias"); its header metadata repeats adapter_config.json

Loading rebuilds the base at the adapter's size (num_classes, img_size: a resampled position embedding is resampled
again, the same way), checks that its architecture is the adapter's (one error naming the fields) and that every
adapter tensor has its place and shape (one error, nothing loaded otherwise), then adds the adapters. A base whose
frozen weights differ from the ones trained on (another revision, another checkpoint of the same architecture)
loads with a warning: its predictions will not be the run's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from flaxvision import files
from flaxvision.errors import FlaxvisionError
from flaxvision.models.base import Classifier
from flaxvision.models.lora import LoRASpec, adapter_state, apply_lora, base_fingerprint, load_adapter_state, lora_spec
from flaxvision.models.registry import default_preprocessing, name_of
from flaxvision.preprocessing import Preprocessing
from flaxvision.weights.hub import read_safetensors, resolve
from flaxvision.weights.loader import load_pretrained
from flaxvision.weights.native_format import config_from_dict, describe

FORMAT = "flaxvision-lora"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Config fields that size or run a model without changing its weights: an adapter's base may differ in them.
NOT_ARCHITECTURE = ("num_classes", "img_size", "dtype", "dropout_rate", "attention_dropout_rate", "drop_path_rate",
                    "scan_blocks", "remat")  # fmt: skip

logger = logging.getLogger(__name__)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _base_id(base: str | Path | None) -> str:
    """How adapter_config.json names the base: a Hub id as given, a local path made absolute, "none"."""
    if base is None or str(base) in ("", "none"):
        return "none"
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else str(base)


def adapter_config(model: Any, *, base: str | Path | None) -> dict[str, Any]:
    """The adapter_config.json of an adapted model trained on `base` (a Hub id or path; None: from scratch)."""
    spec = lora_spec(model)
    if spec is None:
        raise FlaxvisionError("the model carries no LoRA adapters: there is no adapter to save (apply_lora adds them)")
    prep = getattr(model, "preprocessing", None) or default_preprocessing(model.config)
    info = describe(model.config, prep, getattr(model, "label_names", None))
    name = name_of(model.config)
    return {**info, "format": FORMAT, "base_model": _base_id(base), "base_sha256": base_fingerprint(model),
            "model_name": None if name.startswith("a ") else name, "lora": spec.to_dict(), "trained": ["lora", "head"]}  # fmt: skip


def save_adapter(model: Any, out: str | Path, *, base: str | Path | None, overwrite: bool = False) -> Path:
    """Write the adapter of `model` (LoRA A/B and the head) to the directory `out`, atomically.

    `base` names the weights the adapters were trained on (a Hub id or path; None: a model trained from scratch).
    """
    from safetensors.numpy import save

    info = adapter_config(model, base=base)
    data = save(adapter_state(model), metadata={"format": FORMAT, FORMAT: json.dumps(info)})
    with files.atomic_directory(out, overwrite=overwrite) as tmp:
        files.write_atomic(tmp / WEIGHTS_FILE, data)
        files.write_json(tmp / CONFIG_FILE, info)
    return Path(out)


def read_adapter(source: str | Path, **hub_kwargs: Any) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(adapter_config.json, tensors, directory) of an adapter directory or Hub repo."""
    directory = resolve(source, **hub_kwargs)
    if not is_adapter_dir(directory):
        raise FlaxvisionError(f"'{source}' is not a LoRA adapter (no {CONFIG_FILE}); pass an adapter directory such "
                              "as a LoRA run's adapter/")  # fmt: skip
    info = files.read_json(directory / CONFIG_FILE)
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("lora"), dict):
        raise FlaxvisionError(f"'{directory / CONFIG_FILE}' is not a flaxvision LoRA adapter config (format {FORMAT!r})")
    if not (directory / WEIGHTS_FILE).is_file():
        raise FlaxvisionError(f"'{source}' has no {WEIGHTS_FILE}; the adapter is incomplete")
    tensors, _ = read_safetensors(directory / WEIGHTS_FILE)
    return info, tensors, directory


def _check_architecture(base: Any, config: Any, what: str) -> None:
    if type(base) is not type(config):
        raise FlaxvisionError(f"{what} was trained on a {name_of(config)}, but the base is {name_of(base)}; "
                              "pass the base it was trained on")  # fmt: skip
    fields = [f.name for f in dataclasses.fields(config) if f.name not in NOT_ARCHITECTURE]
    diffs = [f"{f} {getattr(base, f)!r} (base) vs {getattr(config, f)!r}" for f in fields if getattr(base, f) != getattr(config, f)]
    if diffs:
        raise FlaxvisionError(f"{what} does not fit this base: {'; '.join(diffs)}; pass the base it was trained on")


def _load_base(base: Any, config: Any, what: str, hub_kwargs: dict[str, Any]) -> Any:
    """The base model at the adapter's size, from a model, a Hub id or path, or a run directory."""
    from flax import nnx

    if isinstance(base, Classifier):
        _check_architecture(base.config, config, what)
        if (base.config.num_classes, base.config.img_size) != (config.num_classes, config.img_size):
            raise FlaxvisionError(
                f"{what} is for num_classes={config.num_classes}, img_size={config.img_size} but the base model has "
                f"{base.config.num_classes}, {base.config.img_size}; pass the base's weights (an id or path) to rebuild it at that size"
            )
        return nnx.clone(base)
    source = Path(base).expanduser()
    if (source / "model").is_dir():  # a run directory: its exported model
        source = source / "model"
    loader_logger = logging.getLogger("flaxvision.weights.loader")
    level = loader_logger.level
    loader_logger.setLevel(logging.ERROR)  # "head replaced": the adapter's head replaces it in a moment
    try:
        model = load_pretrained(str(source) if source.exists() else str(base), num_classes=config.num_classes,
                                img_size=config.img_size, **hub_kwargs)  # fmt: skip
    finally:
        loader_logger.setLevel(level)
    _check_architecture(model.config, config, what)
    return model


def load_adapter(source: str | Path, base: str | Path | Classifier | None = None, **hub_kwargs: Any) -> Any:
    """A LoRA adapter on its base: the base model with the adapter's LoRA parameters and head, in eval mode.

    Args:
      source: an adapter directory (a LoRA run's adapter/, a `save_adapter` output) or a Hub repo holding one.
      base: the base weights (a Hub id, a directory or file, a run directory, or a model); None: the base named in
        adapter_config.json (a Hub id is fetched through the Hub cache: offline, a clear error says what to do).
      **hub_kwargs: revision, token, cache_dir for Hub sources.
    The result is unmerged (`merge_lora` gives the plain model); label names and preprocessing are the adapter's.
    """
    info, tensors, directory = read_adapter(source, **hub_kwargs)
    what = f"the LoRA adapter '{source}'"
    config = config_from_dict(info, what)
    lora = info["lora"]
    try:
        spec = LoRASpec(int(lora["rank"]), float(lora["alpha"]), tuple(lora["targets"]), float(lora.get("dropout", 0.0)))
    except (KeyError, TypeError, ValueError) as err:
        raise FlaxvisionError(f"{directory / CONFIG_FILE}: its lora entry is incomplete or invalid ({err})") from None
    if base is None:
        base = info.get("base_model") or "none"
        if base == "none":
            raise FlaxvisionError(f"{what} was trained on a model built from scratch (no pretrained base to put it "
                                  "on); use the run's merged model/ directory instead (in Python, give load_adapter "
                                  "the model it was trained on)")  # fmt: skip
        try:
            model = _load_base(base, config, what, hub_kwargs)
        except FlaxvisionError as err:
            raise FlaxvisionError(f"the base that {what} names in its adapter_config.json ({base}) cannot be loaded: "
                                  f"{err}; restore it there, or use the run's merged model/ directory") from None
    else:
        model = _load_base(base, config, what, hub_kwargs)
    recorded = info.get("base_sha256")
    if recorded and base_fingerprint(model) != recorded:
        logger.warning("%s: the base weights of %s differ from those it was trained on; its predictions will differ "
                       "from the run's", what, base if isinstance(base, (str, Path)) else "the given model")  # fmt: skip
    apply_lora(model, rank=spec.rank, alpha=spec.alpha, targets=spec.targets, dropout=spec.dropout)
    load_adapter_state(model, tensors, what=what)
    labels = info.get("label_names")
    model.label_names = tuple(labels) if labels is not None else None
    if info.get("preprocessing"):
        model.preprocessing = Preprocessing.from_dict(info["preprocessing"])
    model.eval()
    return model
