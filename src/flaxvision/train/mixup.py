"""Mixup and CutMix on the device, inside the jitted train step (timm's `Mixup` semantics).

Each image is mixed with its partner in the reversed batch (example i with example B-1-i), with a weight `lam`
drawn from Beta(alpha, alpha). With the batch split over several devices, each device reverses its own part (as
timm does in each process under DDP): no image crosses devices, so the step needs no collective for it.

  * mixup:  x_i <- lam * x_i + (1 - lam) * x_(B-1-i)
  * CutMix: a box of area (1 - lam) of the image is pasted from the partner; lam is then corrected to the box's
    true area (the box is clipped at the borders), as timm's `correct_lam=True` does.

The targets are the same convex combination of the two examples' one-hot labels, each label-smoothed first
(timm's `mixup_target`: on = 1 - s + s/K, off = s/K), so every target row sums to 1. In "batch" mode one lam
(and one box) serves the whole batch; in "elem" mode every example draws its own lam, its own mixup/CutMix choice
and its own box. With probability 1 - prob a batch (or, in "elem" mode, an example) stays unmixed (lam = 1).

Everything is drawn from the step's key, a function of (seed, step): a resumed run mixes exactly as one that never
stopped (on the same number of devices).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax


@dataclass(frozen=True)
class MixConfig:
    mixup: float = 0.0  # Beta alpha of mixup (0: off)
    cutmix: float = 0.0  # Beta alpha of CutMix (0: off)
    prob: float = 1.0  # probability that a batch (element) is mixed at all
    switch_prob: float = 0.5  # with both on: probability of CutMix instead of mixup
    mode: str = "batch"  # "batch" or "elem"
    label_smoothing: float = 0.0
    off_step: int | None = None  # steps from this one on are not mixed (timm's mixup_off_epoch x steps/epoch)
    groups: int = 1  # the batch's parts that mix among themselves (the data-parallel device count)

    @classmethod
    def from_train_config(cls, config, steps_per_epoch: int, groups: int = 1) -> MixConfig | None:
        """The MixConfig of a TrainConfig (with the batch over `groups` devices), or None when it mixes nothing."""
        if not config.mixes:
            return None
        off = None if config.mixup_off_epoch is None else config.mixup_off_epoch * steps_per_epoch
        return cls(mixup=config.mixup, cutmix=config.cutmix, prob=config.mixup_prob,
                   switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                   label_smoothing=config.label_smoothing, off_step=off, groups=groups)  # fmt: skip


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Label-smoothed one-hot targets (float32): on = 1 - s + s/K, off = s/K."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


def draw(key: jax.Array, batch: int, cfg: MixConfig, active: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lam, use_cutmix), each of shape (batch,): the mixing weight and the kind of mix of every example."""
    k_apply, k_switch, k_mixup, k_cutmix = jax.random.split(key, 4)
    n = batch if cfg.mode == "elem" else 1

    def beta(k, alpha):
        return jax.random.beta(k, alpha, alpha, (n,), jnp.float32) if alpha > 0 else jnp.ones((n,), jnp.float32)

    if cfg.mixup > 0 and cfg.cutmix > 0:
        use_cutmix = jax.random.uniform(k_switch, (n,)) < cfg.switch_prob
    else:
        use_cutmix = jnp.full((n,), cfg.cutmix > 0)
    lam = jnp.where(use_cutmix, beta(k_cutmix, cfg.cutmix), beta(k_mixup, cfg.mixup))
    applied = (jax.random.uniform(k_apply, (n,)) < cfg.prob) & active
    lam = jnp.where(applied, lam, 1.0)
    return jnp.broadcast_to(lam, (batch,)), jnp.broadcast_to(use_cutmix, (batch,))


def cutmix_boxes(key: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Per-example boxes of area ~(1 - lam) (timm's `rand_bbox`, centre uniform, clipped at the borders) as
    (mask (B, H, W, 1) bool, corrected lam (B,): 1 - the clipped box's share of the image)."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = jnp.floor(height * ratio).astype(jnp.int32), jnp.floor(width * ratio).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, lam.shape, 0, height)
    cx = jax.random.randint(kx, lam.shape, 0, width)
    yl, yh = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height)
    xl, xh = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside = (rows >= yl[:, None, None]) & (rows < yh[:, None, None]) & (cols >= xl[:, None, None]) & (cols < xh[:, None, None])
    corrected = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (height * width)
    return inside[..., None], corrected


def partners(x: jax.Array, groups: int) -> jax.Array:
    """Each example's partner: the batch reversed within each of `groups` equal parts (one per device)."""
    if groups == 1 or x.shape[0] % groups:
        return x[::-1]
    parts = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    return parts[:, ::-1].reshape(x.shape)


def mix_batch(images: jax.Array, labels: jax.Array, key: jax.Array, cfg: MixConfig, num_classes: int,
              step: jax.Array) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """Mix a batch of model inputs (B, H, W, C) and return (mixed images, soft targets (B, K) that sum to 1).

    `step` (the optimizer step about to be taken) turns mixing off from `cfg.off_step` on.
    """
    batch, height, width = images.shape[:3]
    active = jnp.asarray(True) if cfg.off_step is None else step < cfg.off_step
    k_draw, k_box = jax.random.split(key)
    lam, use_cutmix = draw(k_draw, batch, cfg, active)
    partner = partners(images, cfg.groups)
    if cfg.cutmix > 0:
        # "batch": one box (drawn once, then broadcast) for the whole batch, as timm; "elem": one per example
        inside, box_lam = cutmix_boxes(k_box, lam if cfg.mode == "elem" else lam[:1], height, width)
        inside = inside & use_cutmix[:, None, None, None]
        lam = jnp.where(use_cutmix, box_lam, lam)
    else:
        inside = jnp.zeros((batch, 1, 1, 1), bool)
    w = lam.astype(images.dtype)[:, None, None, None]
    blended = images * w + partner * (1 - w)
    mixed = jnp.where(inside, partner, jnp.where(use_cutmix[:, None, None, None], images, blended))
    y = soft_targets(labels, num_classes, cfg.label_smoothing)
    targets = y * lam[:, None] + partners(y, cfg.groups) * (1.0 - lam[:, None])
    return mixed, targets
