"""An exponential moving average of the weights, kept on the device beside them (timm's `ModelEmaV3` semantics).

After optimizer update n (n = 1, 2, ...), every floating-point array of the trained parameters and of the other
model state (BatchNorm statistics) moves towards the new value:

    ema <- ema + (1 - d_n) * (new - ema),  d_n = 0 for n = 1 (the EMA starts as a copy of the weights), else
    d_n = decay, or with warmup min(decay, 1 - (1 + (n - 1)) ** -2/3)

Integer state is copied. Frozen parameters never change, so their average is themselves and is not stored. The
average lives in `TrainState.ema` ({"params", "model_state"}), so it is sharded like the weights, saved in every
checkpoint and restored with them: a resumed run continues the same average.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

WARMUP_POWER = 2 / 3  # timm's default warmup_power (warmup_gamma 1)


def decay_at(updates: jax.Array | int, decay: float, warmup: bool) -> jax.Array:
    """The decay applied at optimizer update number `updates` (1-based), as timm's `get_decay(step=updates)`."""
    s = jnp.asarray(updates, jnp.float32) - 1.0
    d = jnp.minimum(1.0 - (1.0 + s) ** -WARMUP_POWER, decay) if warmup else jnp.float32(decay)
    return jnp.where(s <= 0, 0.0, jnp.maximum(d, 0.0)).astype(jnp.float32)


def init(params: Any, model_state: Any) -> dict[str, Any]:
    """The EMA before any update: a copy of the weights (the first update replaces it anyway)."""
    return {"params": jax.tree.map(jnp.copy, params), "model_state": jax.tree.map(jnp.copy, model_state)}


def update(ema: dict[str, Any], params: Any, model_state: Any, decay: jax.Array) -> dict[str, Any]:
    def lerp(old, new):
        if not jnp.issubdtype(new.dtype, jnp.floating):
            return new
        moved = (old + (1.0 - decay).astype(old.dtype) * (new - old)).astype(old.dtype)
        return jnp.where(decay == 0, new.astype(old.dtype), moved)  # the first update copies exactly

    return {"params": jax.tree.map(lerp, ema["params"], params),
            "model_state": jax.tree.map(lerp, ema["model_state"], model_state)}  # fmt: skip


def weights(state: Any) -> Any:
    """`state` (a TrainState) with the EMA in place of the raw weights, for evaluation and export."""
    return state.replace(params=state.ema["params"], model_state=state.ema["model_state"])
