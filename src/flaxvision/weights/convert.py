"""The machinery every weights format shares: conversion rules, and the check that names both sides.

A format module describes its layout as a list of `Rule`s, one per flaxvision parameter: which tensor name(s) of
the weights file hold it and how to transform the arrays each way (PyTorch Linear (out, in) <-> kernel (in, out), conv OIHW <->
HWIO, separate q/k/v <-> the fused qkv kernel ...). The same rules then serve three purposes:
  * import:  the file's tensor dict -> flaxvision flat dict ("blocks.0.attn.qkv.kernel" -> array);
  * export:  flaxvision flat dict -> the file's tensor dict;
  * checking: exporting *shape-only* parameters (zero-stride arrays, no memory) gives every key and shape the
    weights must have, so missing, unexpected and mis-shaped tensors are all reported in one error, in the
    file's own names (like big_vision's merge_params), before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from flaxvision.errors import FlaxvisionError
from flaxvision.models.base import param_path
from flaxvision.models.registry import abstract_model
from flaxvision.preprocessing import Preprocessing

Arrays = dict[str, np.ndarray]
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One flaxvision parameter and the tensor(s) of the weights file it comes from.

    Attributes:
      keys: tensor names in the file, in the order `to_flax` takes them and `to_file` returns them.
      flax: the flaxvision parameter path, dotted ("blocks.0.norm1.scale").
      to_flax: the file's arrays -> the flaxvision array.
      to_file: the flaxvision array -> the file's arrays.
    """

    keys: tuple[str, ...]
    flax: str
    to_flax: Callable[..., np.ndarray]
    to_file: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def copy(key: str, flax: str) -> Rule:
    return Rule((key,), flax, lambda a: a, lambda a: (a,))


def linear(key: str, flax: str) -> Rule:
    """PyTorch Linear weight (out, in) <-> flax kernel (in, out)."""
    return Rule((key,), flax, lambda w: w.T, lambda k: (k.T,))


def conv(key: str, flax: str) -> Rule:
    """PyTorch conv weight (O, I, kh, kw) <-> flax HWIO kernel (kh, kw, I, O)."""
    return Rule((key,), flax, lambda w: w.transpose(2, 3, 1, 0), lambda k: (k.transpose(3, 2, 0, 1),))


def fused(keys: tuple[str, ...], flax: str, part_to_flax: Callable, part_to_file: Callable, axis: int) -> Rule:
    """Several tensors of the file (q, k, v) concatenated along `axis` into one flaxvision parameter."""

    def to_flax(*parts: np.ndarray) -> np.ndarray:
        return np.concatenate([part_to_flax(p) for p in parts], axis=axis)

    def to_file(value: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(part_to_file(p) for p in np.split(value, len(keys), axis=axis))

    return Rule(tuple(keys), flax, to_flax, to_file)


# ---- flaxvision side -------------------------------------------------------------------------------------------


def weight_state(model: nnx.Module) -> dict[str, Any]:
    """Dotted path -> value of every parameter and batch statistic (what a weights file stores)."""
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))  # one state: either kind
    return {param_path(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def shape_only(shapes: Mapping[str, tuple[int, ...]]) -> Arrays:
    """Zero-stride stand-ins for parameters: reshaping and slicing them costs no memory."""
    return {k: np.broadcast_to(np.float32(0), tuple(s)) for k, s in shapes.items()}


# ---- applying rules ------------------------------------------------------------------------------------------


def export(rules: Iterable[Rule], params: Mapping[str, np.ndarray]) -> Arrays:
    """flaxvision flat dict -> the file's tensor dict."""
    out: Arrays = {}
    for rule in rules:
        for key, value in zip(rule.keys, rule.to_file(np.asarray(params[rule.flax])), strict=True):
            out[key] = value
    return out


def expected_layout(rules: list[Rule], flax_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every tensor name the rules read from a file, with its shape, for a model with these parameter shapes."""
    return {k: tuple(v.shape) for k, v in export(rules, shape_only(flax_shapes)).items()}


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_layout(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    ignored: Iterable[str] = (),
) -> None:
    """Raise ONE error listing missing keys, unexpected keys and shape mismatches (the file's names), if any."""
    present = set(tensors) - set(ignored)
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    mismatched = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k])}"
        for k in sorted(present & set(expected))
        if tuple(tensors[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing from the weights ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected in the weights ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches, weights vs model ({len(mismatched)}): {_listing(mismatched)}")
    if problems:
        raise FlaxvisionError(
            f"{what}: {'; '.join(problems)}; nothing was loaded - pass the matching weights, or fix their config.json"
        )


def check_names(
    rules: list[Rule],
    tensors: Mapping[str, np.ndarray],
    config: Any,
    *,
    what: str,
    ignored: Iterable[str] = (),
) -> None:
    """Before any model is built: the config's layers and size against the file's tensors.

    Building even a shape-only model of a config.json that says 300 layers over 12 of tensors takes minutes (and
    of a huge width, memory); these checks need the rules, the tensor names and sizes only, so they fail at once.
    A layer counts as held when the file has any tensor of it; check_layout then names every missing tensor.
    """
    present = set(tensors) - set(ignored)
    layers = config.num_layers()
    if layers > 0:
        held = set()
        for rule in rules:
            index = config.layer_index(rule.flax)
            if 1 <= index <= layers and any(k in present for k in rule.keys):
                held.add(index)
        if len(held) < layers:
            raise FlaxvisionError(
                f"{what}: the config says {layers} layers, the tensors hold {len(held)}; nothing was loaded - pass "
                "the matching weights, or fix their config.json"
            )
    expected = config.param_count()
    held_values = sum(int(tensors[k].size) for k in present)
    if expected > 2 * held_values + 10**6:  # the config describes a far larger model than the file holds
        raise FlaxvisionError(
            f"{what}: the config describes {expected:,} parameters, the tensors hold {held_values:,} values; "
            "nothing was loaded - pass the matching weights, or fix their config.json"
        )


def check_dtypes(rules: Iterable[Rule], tensors: Mapping[str, np.ndarray], *, what: str) -> None:
    """Refuse integer, bool and complex tensors where a float parameter belongs, naming them: they are not cast."""
    bad = sorted({f"{k} ({tensors[k].dtype})" for r in rules for k in r.keys if k in tensors and tensors[k].dtype.kind != "f"})
    if bad:
        raise FlaxvisionError(
            f"{what}: {len(bad)} tensor(s) of float parameters hold other types: {_listing(bad)}; flaxvision does not "
            "cast them - pass float weights (float32, float16 or bfloat16)"
        )


def nonfinite_tensors(tensors: Mapping[str, np.ndarray], names: Iterable[str] | None = None) -> list[str]:
    """'name (3 NaN, 1 Inf)' for each float tensor (of `names`, default all) holding NaN or Inf values."""
    found = []
    for name in sorted(tensors if names is None else set(names) & set(tensors)):
        value = np.asarray(tensors[name])
        if value.dtype.kind != "f" or bool(np.isfinite(value).all()):
            continue
        nans, infs = int(np.isnan(value).sum()), int(np.isinf(value).sum())
        found.append(f"{name} ({', '.join(p for p in (f'{nans} NaN' * bool(nans), f'{infs} Inf' * bool(infs)) if p)})")
    return found


def describe_nonfinite(found: list[str]) -> str:
    return f"{len(found)} tensor(s) hold NaN or Inf values: {_listing(found, 8)}"


def import_params(rules: Iterable[Rule], tensors: Mapping[str, np.ndarray]) -> Arrays:
    """The file's tensor dict (already checked) -> flaxvision flat dict, float32 (from float tensors only)."""
    rules = list(rules)
    check_dtypes(rules, tensors, what="weights")
    return {r.flax: np.asarray(r.to_flax(*(tensors[k] for k in r.keys)), dtype=np.float32) for r in rules}


# ---- results ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Parsed:
    """What a format module makes of pretrained weights, before any adaptation to the requested model.

    Attributes:
      format: "transformers", "timm", "npz" or "flaxvision".
      tensors: the file's tensors in the layout the rules read (some formats rename variants first).
      config: the flaxvision config of the weights as saved (its image size and number of classes).
      rules: how its tensors map to flaxvision parameters.
      has_head: whether it has a classifier (transformers' ViTModel weights do not).
      label_names: class names in label order, when the weights come with them.
      preprocessing: the eval preprocessing saved with the weights (or the format's documented default).
      ignored: tensor names deliberately left out (e.g. ViTModel's pooler, unused by a classifier).
    """

    format: str
    tensors: dict[str, np.ndarray]
    config: Any
    rules: list[Rule]
    has_head: bool = True
    label_names: tuple[str, ...] | None = None
    preprocessing: Preprocessing | None = None
    ignored: tuple[str, ...] = ()


# ---- detection ----------------------------------------------------------------------------------------------


def detect_transformers(weights: Any, model_types: Iterable[str], keys_match: Callable[[Any], bool]) -> bool:
    """A transformers layout's `detect`: config.json's model_type when there is one, else the tensor names."""
    config = weights.config or {}
    if "model_type" in config:
        return config["model_type"] in tuple(model_types)
    return "architecture" not in config and keys_match(weights.tensors.keys())


def detect_timm(weights: Any, architecture: Callable[[str], bool], keys_match: Callable[[Any], bool]) -> bool:
    """A timm layout's `detect`: config.json's architecture when there is one, else the tensor names."""
    config = weights.config or {}
    if "architecture" in config:
        return architecture(str(config["architecture"]))
    return "model_type" not in config and keys_match(weights.tensors.keys())


# ---- what a layout supports -------------------------------------------------------------------------------------


def check_supported(
    tensors: Mapping[str, Any],
    args: Mapping[str, Any],
    what: str,
    family: str,
    *,
    unsupported_keys: Iterable[tuple[str, str]],
    read: Iterable[str],
    ignored: Iterable[str],
    fixed: Mapping[str, Any],
    same: Callable[[Any, Any], bool] = lambda value, only: value == only,
) -> None:
    """One error for the first variant a timm-style layout cannot express: a tensor that only exists in it (by name
    fragment), a model argument it does not know, or a known one (`fixed`) with a value other than the one
    supported (`same(value, only)` decides; arguments in `read` or `ignored` pass)."""
    for fragment, option in unsupported_keys:
        key = next((k for k in tensors if k.startswith(fragment) or fragment in k), None)
        if key is not None:
            raise FlaxvisionError(f"{what}: {option} is not supported by flaxvision's {family} (found tensor '{key}')")
    passing = set(read) | set(ignored)
    for name, value in args.items():
        if name in passing:
            continue
        if name not in fixed:
            raise FlaxvisionError(f"{what}: timm model argument {name}={value!r} is not supported by flaxvision's {family}")
        if not same(value, fixed[name]):
            raise FlaxvisionError(f"{what}: {name}={value!r} is not supported by flaxvision's {family} (only {fixed[name]!r})")


# ---- architecture inference ------------------------------------------------------------------------------------

# Standard ViT widths and their head counts (DeiT/ViT papers; huge and giant use 16 heads of 80/88).
HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}


def default_num_heads(width: int) -> int:
    """Head count for a width when the weights do not say (bare files): the standard ViT sizes, else 64-d heads
    (a guess, reported: the tensors' shapes are the same for any head count that divides the width)."""
    if width in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[width]
    heads = max(1, width // 64)
    logger.warning(
        "the weights do not say how many attention heads they have: assuming %d (64-d heads) for the non-standard "
        "width %d; pass the config.json that came with them if that is wrong", heads, width,
    )  # fmt: skip
    return heads


def require(tensors: Mapping[str, np.ndarray], key: str, what: str, ndim: int = 1, hint: str = "") -> np.ndarray:
    """The tensor `key` of weights whose architecture is read from shapes, with at least `ndim` axes; one
    FlaxvisionError naming it otherwise (a 0-d or flattened tensor would be an IndexError in `.shape[i]`)."""
    if key not in tensors:
        raise FlaxvisionError(f"{what}: cannot infer the architecture without '{key}'{hint}")
    value = tensors[key]
    if value.ndim < ndim:
        raise FlaxvisionError(
            f"{what}: '{key}' has shape {tuple(value.shape)}, fewer than the {ndim} axes it needs; pass the matching weights"
        )
    return value


def square(value: Any, field: str, what: str) -> int:
    """An int from an int or an [h, w] pair that must be square (flaxvision ViTs take square inputs)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise FlaxvisionError(f"{what}: {field}={list(value)} is not square; flaxvision ViTs take square images and patches")
        value = value[0]
    if not isinstance(value, int):
        raise FlaxvisionError(f"{what}: {field}={value!r} is not an integer")
    return value


def grid_of(pos_embed: np.ndarray, prefix_tokens: int, what: str) -> int:
    """Patches per side from a (1, prefix + g*g, D) position embedding."""
    if pos_embed.ndim < 2:
        raise FlaxvisionError(f"{what}: a position embedding of shape {tuple(pos_embed.shape)} is not (1, tokens, width)")
    tokens = pos_embed.shape[-2] - prefix_tokens
    grid = int(round(max(tokens, 0) ** 0.5))
    if grid * grid != tokens or grid == 0:
        raise FlaxvisionError(f"{what}: position embedding of {pos_embed.shape[-2]} tokens is not a square grid plus a CLS token")
    return grid


def block_count(keys: Iterable[str], prefix: str) -> int:
    """1 + the largest i of keys '<prefix><i>.'."""
    found = [int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()]
    return max(found) + 1 if found else 0


@functools.lru_cache(maxsize=8)
def abstract_split(config: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, shape-only state) of the model for `config`, built once per config with nnx.eval_shape."""
    return nnx.split(abstract_model(config))


def param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every parameter and batch statistic of the model for `config` (no memory used)."""
    graphdef, state = abstract_split(config)
    return {k: tuple(v.shape) for k, v in weight_state(nnx.merge(graphdef, state)).items()}
