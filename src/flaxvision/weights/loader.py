"""`load_pretrained`: pretrained weights in any supported format -> a flaxvision model, with labels and preprocessing.

    >>> model = flaxvision.load_pretrained("google/vit-base-patch16-224")               # Hub, transformers format
    >>> model = flaxvision.load_pretrained("vit/model.safetensors", num_classes=20)     # new zero-initialised head
    >>> model = flaxvision.create_model("vit_base_patch16_224", pretrained="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", img_size=384)

Steps: read the files (weights.hub) -> detect the format and read the architecture (weights.transformers_format /
timm_format / npz_format / native_format; the config's every field is type- and range-checked) -> check the
config's layers and size and the tensor names against the file, before any model is built (fast, however wrong
the config) -> check every tensor name and shape against that architecture (one error naming all problems) ->
check dtypes (no integer or bool tensor is cast to a float parameter) and report NaN/Inf values -> convert to
flaxvision names -> adapt (new head, resampled position embedding) -> set the arrays into a shape-only model built
with nnx.eval_shape -> merge.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvision.errors import ConfigError, FlaxvisionError
from flaxvision.models.base import HEAD_INITS, Classifier, param_path
from flaxvision.models.registry import default_preprocessing, dtype_name, list_models, model_config
from flaxvision.weights.convert import (
    Parsed,
    abstract_split,
    check_dtypes,
    check_layout,
    check_names,
    describe_nonfinite,
    expected_layout,
    import_params,
    nonfinite_tensors,
    param_shapes,
)
from flaxvision.weights.hub import read_weights
from flaxvision.weights.layouts import parse_weights
from flaxvision.weights.posembed import resample_pos_embed

logger = logging.getLogger(__name__)

# Config fields that describe how a model is trained or run, not which weights it has: callers may change them.
TUNABLE = ("dropout_rate", "attention_dropout_rate", "drop_path_rate", "bn_momentum", "scan_blocks", "remat")
# Fields a registry name may differ in from the weights (the weights' values win).
NOT_ARCHITECTURE = {"num_classes", "img_size", "dtype", "layer_norm_eps", "act", "bn_eps", "fc_norm", *TUNABLE}
NONFINITE = ("warn", "error")  # what load_pretrained does with NaN/Inf weights


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_pretrained` did.

    Attributes:
      source: what was passed; format: "transformers", "timm", "npz" or "flaxvision"; files: weight files read.
      config: the config of the returned model.
      source_num_classes: classes of the head of the weights read (None: they had none).
      head_replaced: the head was re-initialised (`head_init`) because num_classes differed or it had none.
      pos_embed_resampled: (grid of the weights, model grid) when the position embedding was resampled.
      ignored_keys: tensors deliberately not loaded (e.g. transformers ViTModel's pooler).
    """

    source: str
    format: str
    files: tuple[str, ...]
    config: Any
    source_num_classes: int | None
    head_replaced: bool = False
    head_init: str | None = None
    pos_embed_resampled: tuple[int, int] | None = None
    ignored_keys: tuple[str, ...] = ()

    def summary(self) -> str:
        lines = [f"loaded {self.format} weights {self.source} ({len(self.files)} file(s))"]
        if self.head_replaced:
            lines.append(
                f"head replaced: {self.source_num_classes} -> {self.config.num_classes} classes, {self.head_init}-initialised"
            )
        if self.pos_embed_resampled:
            old, new = self.pos_embed_resampled
            lines.append(f"position embedding resampled: {old}x{old} -> {new}x{new} patches (bicubic, antialiased, as timm)")
        if self.ignored_keys:
            lines.append(f"not loaded (unused by a classifier): {', '.join(self.ignored_keys)}")
        return "\n".join(lines)


def check_architecture(name: str, config: Any, origin: str) -> None:
    """Raise when a registry name's architecture differs from that of the weights, listing the fields."""
    named = model_config(name)
    if type(named) is not type(config):
        raise FlaxvisionError(
            f"'{origin}' holds a {type(config).__name__.removesuffix('Config')}, not a {name}; "
            f"use create_model(None, pretrained=...) to build what the weights hold"
        )
    fields = [f.name for f in dataclasses.fields(config) if f.name not in NOT_ARCHITECTURE]
    diffs = [f"{f} {getattr(config, f)!r} (weights) vs {getattr(named, f)!r}" for f in fields if _field(config, f) != _field(named, f)]
    if diffs:
        same = [n for n in list_models() if _same_architecture(model_config(n), config, fields)]
        hint = f"use {', '.join(map(repr, same[:3]))} or None" if same else "use name=None"
        raise FlaxvisionError(f"'{origin}' is not a {name}: {'; '.join(diffs)}; {hint} to build what the weights hold")


def _field(config: Any, name: str) -> Any:
    # Layer scale's init value only initialises the gains the weights hold: whether there is layer scale matters.
    value = getattr(config, name)
    return value is not None if name == "init_values" else value


def _same_architecture(a: Any, b: Any, fields: list[str]) -> bool:
    return type(a) is type(b) and all(_field(a, f) == _field(b, f) for f in fields)


def _target_config(parsed: Parsed, num_classes: int | None, img_size: int | None, dtype: Any, overrides: dict[str, Any]) -> Any:
    config = parsed.config
    fields = {f.name for f in dataclasses.fields(config)}
    bad = sorted(k for k in overrides if k not in TUNABLE or k not in fields)
    if bad:
        allowed = ", ".join(k for k in TUNABLE if k in fields)
        raise ConfigError(
            f"{bad[0]}={overrides[bad[0]]!r} would change the architecture of a pretrained model; options: num_classes, "
            f"img_size, dtype, {allowed}"
        )
    changes = dict(overrides)
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if img_size is not None:
        changes["img_size"] = img_size
    if dtype is not None:
        changes["dtype"] = dtype_name(dtype)
    return dataclasses.replace(config, **changes)


def _adapt(params: dict[str, np.ndarray], parsed: Parsed, target: Any, head_init: str, seed: int) -> tuple[bool, tuple[int, int] | None]:
    """Resample the position embedding and replace the head in place, as the target needs. Returns what changed."""
    resampled = None
    grid, source_grid = target.position_grid(), parsed.config.position_grid()
    if grid is not None and source_grid is not None and grid != source_grid:
        params["pos_embed"] = resample_pos_embed(params["pos_embed"], grid, num_prefix_tokens=target.position_prefix())
        resampled = (source_grid, grid)
    replace = not parsed.has_head or target.num_classes != parsed.config.num_classes
    if replace:
        shapes = param_shapes(target)
        for index, head in enumerate(h for h in ("head", "head_dist") if f"{h}.kernel" in shapes):  # DeiT: two heads
            kernel_shape = shapes[f"{head}.kernel"]
            if head_init == "zeros":  # the ViT transfer recipe: start from a zero head, predictions start uniform
                params[f"{head}.kernel"] = np.zeros(kernel_shape, np.float32)
            else:
                draw = nnx.initializers.truncated_normal(stddev=0.02)
                params[f"{head}.kernel"] = np.asarray(draw(jax.random.fold_in(jax.random.key(seed), index), kernel_shape, jnp.float32))
            params[f"{head}.bias"] = np.zeros(shapes[f"{head}.bias"], np.float32)
    return replace, resampled


def materialise(config: Any, params: dict[str, np.ndarray], *, seed: int = 0, what: str = "weights") -> Classifier:
    """The model for `config` with exactly these parameters and batch statistics (all of them, right shapes)."""
    graphdef, state = abstract_split(config)
    flat, problems = [], []
    base_key = jax.random.key(seed)
    seen = set()
    for index, (path, variable) in enumerate(nnx.to_flat_state(state)):
        name, abstract = param_path(path), variable.get_value()
        if isinstance(variable, (nnx.Param, nnx.BatchStat)):
            seen.add(name)
            value = params.get(name)
            if value is None:
                problems.append(f"{name} missing")
                continue
            if tuple(value.shape) != tuple(abstract.shape):
                problems.append(f"{name} {tuple(value.shape)} vs {tuple(abstract.shape)}")
                continue
            new = jnp.asarray(value, dtype=abstract.dtype)
        elif isinstance(variable, nnx.RngKey):  # dropout streams: fresh, distinct per layer
            new = jax.random.fold_in(base_key, index)
        else:
            new = jnp.zeros(abstract.shape, abstract.dtype)
        flat.append((path, variable.replace(value=new)))
    problems += [f"{name} unexpected" for name in sorted(set(params) - seen)]
    if problems:
        raise FlaxvisionError(
            f"{what} cannot be loaded into a model with img_size={config.img_size}, num_classes={config.num_classes}: "
            f"{', '.join(problems[:8])}; load it at its own size"
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# The overloads give callers the precise return type: the model, or (model, LoadReport) with return_report=True.
@overload
def load_pretrained(
    source: str | Path,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    dtype: Any = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    head_init: str = "zeros",
    label_names: Sequence[str] | None = None,
    name: str | None = None,
    seed: int = 0,
    nonfinite: str = "warn",
    return_report: Literal[False] = False,
    **overrides: Any,
) -> Classifier: ...


@overload
def load_pretrained(
    source: str | Path,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    dtype: Any = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    head_init: str = "zeros",
    label_names: Sequence[str] | None = None,
    name: str | None = None,
    seed: int = 0,
    nonfinite: str = "warn",
    return_report: Literal[True],
    **overrides: Any,
) -> tuple[Classifier, LoadReport]: ...


@overload
def load_pretrained(
    source: str | Path,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    dtype: Any = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    head_init: str = "zeros",
    label_names: Sequence[str] | None = None,
    name: str | None = None,
    seed: int = 0,
    nonfinite: str = "warn",
    return_report: bool,
    **overrides: Any,
) -> Classifier | tuple[Classifier, LoadReport]: ...


def load_pretrained(
    source: str | Path,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    dtype: Any = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    head_init: str = "zeros",
    label_names: Sequence[str] | None = None,
    name: str | None = None,
    seed: int = 0,
    nonfinite: str = "warn",
    return_report: bool = False,
    **overrides: Any,
) -> Classifier | tuple[Classifier, LoadReport]:
    """Build a flaxvision model from pretrained weights.

    Args:
      source: a Hub repo id ("google/vit-base-patch16-224", "org/name@revision"), a local directory, or a
        .safetensors / .safetensors.index.json / .npz file.
      num_classes: classes of the returned model; a different number than the weights' replaces the head.
      img_size: input size of the returned model; a ViT's position embedding is resampled (bicubic, as timm).
      dtype: compute dtype ("float32", "bfloat16"); parameters stay float32.
      allow_pickle: read pickled PyTorch .bin/.pth files (torch.load runs code from the file: trusted files only).
      revision, token, cache_dir: for Hub sources, as in huggingface_hub.
      head_init: "zeros" (the ViT transfer recipe) or "random" (truncated normal, std 0.02) for a replaced head.
      label_names: class names of the new head (default: those of the weights when their head is kept).
      name: a registry name the weights must match (e.g. "vit_base_patch16_224"); None accepts any.
      seed: seeds a random head and the dropout streams.
      nonfinite: NaN or Inf values in the weights: "warn" (a warning naming the tensors and counts; the model is
        returned) or "error" (a FlaxvisionError naming them; what `flaxvision export` does).
      return_report: return (model, LoadReport) instead of the model.
      **overrides: training-time config fields: dropout_rate, attention_dropout_rate, drop_path_rate, bn_momentum.

    Example: `load_pretrained("google/vit-base-patch16-224", num_classes=20)`.
    """
    if head_init not in HEAD_INITS:
        raise ConfigError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
    if nonfinite not in NONFINITE:
        raise ConfigError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
    weights = read_weights(source, allow_pickle=allow_pickle, revision=revision, token=token, cache_dir=cache_dir)
    try:
        parsed = parse_weights(weights)
    except ConfigError as err:  # the config the file describes is not a valid model: say which file
        raise ConfigError(f"weights '{source}' describe an invalid model: {err}; fix their config.json or pass the matching weights") from None
    what = f"{parsed.format} weights '{source}'"
    if name is not None:
        check_architecture(name, parsed.config, str(source))
    check_names(parsed.rules, parsed.tensors, parsed.config, what=what, ignored=parsed.ignored)
    check_layout(parsed.tensors, expected_layout(parsed.rules, param_shapes(parsed.config)), what=what, ignored=parsed.ignored)
    check_dtypes(parsed.rules, parsed.tensors, what=what)
    found = nonfinite_tensors(parsed.tensors, (k for rule in parsed.rules for k in rule.keys))
    if found and nonfinite == "error":
        raise FlaxvisionError(f"{what}: {describe_nonfinite(found)}; nothing was loaded - re-download the weights")
    if found:
        logger.warning("%s: %s; the model's outputs will be NaN - re-download the weights", what, describe_nonfinite(found))
    params = import_params(parsed.rules, parsed.tensors)
    if not parsed.has_head and num_classes is None:
        raise FlaxvisionError(f"{what} has no classifier head (backbone-only weights); pass num_classes= to add one")
    target = _target_config(parsed, num_classes, img_size, dtype, overrides)
    head_replaced, resampled = _adapt(params, parsed, target, head_init, seed)
    model = materialise(target, params, seed=seed, what=what)

    if head_replaced:
        labels = tuple(label_names) if label_names is not None else None
        logger.warning(
            "%s: head replaced (%s -> %d classes, %s-initialised); fine-tune it before use",
            what, parsed.config.num_classes if parsed.has_head else "none", target.num_classes, head_init,
        )  # fmt: skip
    else:
        labels = tuple(label_names) if label_names is not None else parsed.label_names
    if labels is not None and len(labels) != target.num_classes:
        raise ConfigError(f"{len(labels)} label names for a model with num_classes={target.num_classes}")
    prep = dataclasses.replace(parsed.preprocessing or default_preprocessing(target), img_size=target.img_size)
    try:  # a format's 3-channel default normalisation, for grayscale weights
        model.preprocessing = prep.for_channels(target.in_chans)
    except ConfigError:
        model.preprocessing = default_preprocessing(target)
    model.label_names = labels
    if resampled:
        logger.info("%s: position embedding resampled from a %d to a %d patch grid", what, *resampled)
    report = LoadReport(
        source=str(source),
        format=parsed.format,
        files=tuple(str(p) for p in weights.files),
        config=target,
        source_num_classes=parsed.config.num_classes if parsed.has_head else None,
        head_replaced=head_replaced,
        head_init=head_init if head_replaced else None,
        pos_embed_resampled=resampled,
        ignored_keys=parsed.ignored,
    )
    return (model, report) if return_report else model
