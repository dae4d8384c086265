"""Optimisers, schedules, weight-decay masks, layer-wise LR decay and freezing, all from a TrainConfig.

Parameters are addressed by their dotted path in the model ("blocks.3.attn.qkv.kernel", "head.bias"). What a
model's layers are (for layer-wise decay and --train-only last:K) its config says: `num_layers()`, `layer_index(path)`.
With LoRA, the adapters' paths lie inside their blocks ("blocks.3.attn.qkv.lora_q.lora_a"): layer-wise decay scales
them as their block.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxvision.errors import ConfigError
from flaxvision.models.base import param_path, require_layers
from flaxvision.models.lora import is_adapter_path
from flaxvision.train.config import TrainConfig, _last_k

# Never weight-decayed (besides every 0/1-D tensor: biases, LayerNorm/BatchNorm scales and offsets).
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then linear or cosine decay to `end_lr` at `total_steps`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if config.schedule == "linear":
        main = optax.linear_schedule(config.lr, config.end_lr, decay_steps)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.end_lr / config.lr)
    else:
        main = optax.constant_schedule(config.lr)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), main], [warmup])


def trainable_predicate(config: TrainConfig, model_config: Any) -> Callable[[tuple], bool]:
    """path -> whether the parameter is trained, from --lora-rank (only the adapters and the head), --train-only and
    --freeze (on top of either)."""
    last_k = _last_k(config.train_only) if config.train_only else None
    layers = require_layers(model_config, f"train_only={config.train_only!r}") if last_k is not None else 0
    if last_k is not None and last_k > layers:
        raise ConfigError(f"train_only={config.train_only!r}: the model has only {layers} blocks")
    try:
        frozen_re = re.compile(config.freeze) if config.freeze else None
    except re.error as err:
        raise ConfigError(f"freeze={config.freeze!r} is not a valid regular expression ({err})") from None

    def trainable(path: tuple) -> bool:
        if config.lora_rank is not None and not is_adapter_path(path):
            return False
        if config.train_only == "head" and path[0] != "head":
            return False
        # The last K layers and what sits above them (final norm, head): layer indices above layers - K.
        if last_k is not None and model_config.layer_index(param_path(path)) <= layers - last_k:
            return False
        return not (frozen_re and frozen_re.search(param_path(path)))

    return trainable


def trainable_filter(config: TrainConfig, model_config: Any) -> nnx.filterlib.Filter:
    predicate = trainable_predicate(config, model_config)
    return nnx.All(nnx.Param, lambda path, _: predicate(path))


def _decay_mask(params: nnx.State) -> Any:
    def decays(path: tuple, leaf: Any) -> bool:
        return leaf.ndim >= 2 and not any(str(p) in NO_DECAY_NAMES for p in path)

    return jax.tree_util.tree_map_with_path(lambda kp, x: decays(_keys(kp), x), params)


def _keys(keypath: tuple) -> tuple:
    """Plain names from a jax key path (DictKey/GetAttrKey/SequenceKey) of an nnx.State."""
    out = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(p for p in out if p != "value")


def _layer_scales(params: nnx.State, model_config: Any, decay: float, option: str = "layer_decay") -> Any:
    """Layer-wise LR decay (BEiT): the update of layer i is scaled by decay ** (top - i), where the config's
    `layer_index` puts the stem/embeddings at 0 and the final norm and head at top = num_layers() + 1."""
    top = require_layers(model_config, option) + 1

    def scale(keypath: tuple) -> jax.Array:
        return jnp.float32(decay ** (top - model_config.layer_index(param_path(_keys(keypath)))))

    return jax.tree_util.tree_map_with_path(lambda kp, x: scale(kp), params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-parameter factor (optax has no per-leaf constant scaling)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    config: TrainConfig, params: nnx.State, model_config: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation for the trainable `params`, and its learning-rate schedule."""
    schedule = learning_rate_schedule(config, total_steps)
    parts = []
    if config.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(config.clip_grad_norm))
    if config.optimizer == "sgd":
        parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
    else:
        parts.append(
            optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=_decay_mask(params))
        )
    if config.layer_decay is not None and config.layer_decay < 1.0:
        scales = _layer_scales(params, model_config, config.layer_decay, option=f"layer_decay={config.layer_decay}")
        parts.append(scale_by_tree(scales))
    return optax.chain(*parts), schedule
