"""Where a classifier looks: attention rollout for ViTs, Grad-CAM for the CNNs, and heat-map overlays.

    >>> inputs = stage.eval_inputs(images)          # model inputs: normalised NHWC floats
    >>> heat = explain(model, inputs)                # (N, H, W) float32 in [0, 1]; the method is method_for(model)
    >>> pictures = overlay(images, heat)             # (N, h, w, 3) uint8: the heat map coloured over each image

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"), for `ViT`: each block's
attention probabilities averaged over the heads, plus the identity (the residual connection), rows renormalised;
multiplied through the blocks (the last on the left); the row of the token the head reads, over the patch tokens,
on the patch grid. The head reads the CLS token with global_pool "token" and "token_avg" (a DeiT distilled model:
the mean of the CLS and distillation rows); with "avg" and "map" (and every model without a CLS token) it reads the
patch tokens, and the map is the mean row of the patch tokens. Register tokens are rows and columns of the product
like any other, and are dropped with the prefix at the end.

Grad-CAM (Selvaraju et al. 2017), for `CNN`, `ResNet`, `ConvNeXt`: A = the last feature map before pooling
(`feature_map`, (N, h, w, C)); w_c = the spatial mean of d logit[target] / dA_c; cam = relu(sum_c w_c A_c). The
target is the predicted class unless `targets` names one per image.

Both maps are resized bilinearly to the input's H x W and scaled to [0, 1] per image: rollout from its minimum to
its maximum, Grad-CAM by its maximum (zero stays "no evidence"); a constant map (a cam of all zeros) is all zeros.
The model runs in evaluation mode (dropout off, BatchNorm on its running statistics) and is left in the mode it had.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvision.errors import FlaxvisionError
from flaxvision.files import make_dirs, storage_error, write_atomic
from flaxvision.models.cnn import CNN
from flaxvision.models.convnext import ConvNeXt
from flaxvision.models.resnet import ResNet
from flaxvision.models.vit import ViT

METHODS = ("rollout", "gradcam")
GRADCAM_FAMILIES = (CNN, ResNet, ConvNeXt)
WHAT_WORKS = "rollout works on vit models, gradcam on cnn, resnet and convnext models"


def _family(model: Any) -> str:
    return f"a {getattr(model, 'family', '') or 'non-flaxvision'} model ({type(model).__name__})"


def method_for(model: Any) -> str:
    """The explanation a model supports: "rollout" for a ViT, "gradcam" for a CNN, ResNet or ConvNeXt."""
    if isinstance(model, ViT):
        return "rollout"
    if isinstance(model, GRADCAM_FAMILIES):
        return "gradcam"
    raise FlaxvisionError(f"no explanation method for {_family(model)}; {WHAT_WORKS}")


def check_method(model: Any, method: str | None) -> str:
    """`method` (None: `method_for(model)`) when the model supports it; otherwise a FlaxvisionError naming the
    method, the model's family and what works."""
    supported = method_for(model)
    if method is None or method == supported:
        return supported
    if method not in METHODS:
        raise FlaxvisionError(f"unknown explanation method {method!r}; use {supported!r} for {_family(model)} ({WHAT_WORKS})")
    raise FlaxvisionError(f"explanation method {method!r} does not work on {_family(model)}; use {supported!r} ({WHAT_WORKS})")


@contextlib.contextmanager
def evaluation_mode(model: nnx.Module) -> Iterator[None]:
    """`model.eval()` for the duration; afterwards every dropout and BatchNorm is back in the mode it had."""
    modes = [(module, name, getattr(module, name)) for _, module in nnx.iter_modules(model)
             for name in ("deterministic", "use_running_average") if hasattr(module, name)]  # fmt: skip
    model.eval()
    try:
        yield
    finally:
        for module, name, value in modes:
            setattr(module, name, value)


def explain(model: Any, inputs: Any, method: str | None = None, *, targets: Any = None) -> np.ndarray:
    """Heat maps (N, H, W) float32 in [0, 1] of where `model` looks in `inputs` (model inputs: normalised NHWC
    floats, as `DeviceStage.eval_inputs` returns them), at the inputs' H x W.

    `method`: "rollout" (ViTs) or "gradcam" (CNNs); None: `method_for(model)`. `targets`: a class index per image
    for Grad-CAM (None: each image's predicted class); rollout does not depend on a class and ignores it.
    """
    method = check_method(model, method)
    inputs = jnp.asarray(inputs)
    model.check_input(inputs)
    with evaluation_mode(model):
        if method == "rollout":
            maps = _rollout_maps(model, inputs)
        else:
            maps = _gradcam_maps(model, inputs, _targets(model, targets, inputs.shape[0]))
    return np.asarray(maps, np.float32)


def _targets(model: Any, targets: Any, n: int) -> jax.Array:
    """Targets as int32 (n,), -1 where the predicted class is meant."""
    if targets is None:
        return jnp.full((n,), -1, jnp.int32)
    array = np.asarray(targets)
    classes = model.config.num_classes
    if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer) or (array < 0).any() or (array >= classes).any():
        raise FlaxvisionError(f"Grad-CAM targets must be {n} class indices from 0 to {classes - 1} (one per image), "
                              f"got {array.tolist() if array.size <= 8 else f'an array of shape {array.shape}'}")  # fmt: skip
    return jnp.asarray(array, jnp.int32)


# ---- attention rollout -----------------------------------------------------------------------------------------


@nnx.jit
def rollout_walk(model: ViT, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ViT's logits (N, classes) and the rollout product (N, T, T) over its T tokens, from one walk over
    `model.blocks` that replays each Block (norm1, attention from explicit probabilities, layer scale, residual;
    norm2, MLP, layer scale, residual) in evaluation mode, so that the logits equal `model(inputs)`'s and the
    probabilities are the ones the model uses. Row i of the product: how much each token flows into token i."""
    x = model.embed(inputs)
    t = x.shape[1]
    eye = jnp.eye(t, dtype=jnp.float32)
    joint = jnp.broadcast_to(eye, (x.shape[0], t, t))
    for block in model.blocks:
        y, probs = block.attn.with_probs(block.norm1(x))
        x = x + (y if block.ls1 is None else block.ls1(y))
        y = block.mlp(block.norm2(x))
        x = x + (y if block.ls2 is None else block.ls2(y))
        layer = probs.mean(axis=1) + eye[None]
        layer = layer / layer.sum(axis=-1, keepdims=True)
        joint = layer @ joint
    x = x if model.config.use_fc_norm else model.norm(x)
    return model.head_from_tokens(x), joint


def rollout_rows(model: ViT, joint: jax.Array) -> jax.Array:
    """The rollout scores of the patches (N, grid, grid): the row of the token the head reads (see the module
    docstring), over the patch tokens."""
    cfg = model.config
    prefix = cfg.num_prefix_tokens
    if cfg.class_token and cfg.global_pool in ("token", "token_avg"):
        rows = joint[:, : 1 + int(cfg.distilled)].mean(axis=1)  # CLS (and DeiT's distillation token)
    else:
        rows = joint[:, prefix:].mean(axis=1)  # the head pools the patch tokens: their mean row
    return rows[:, prefix:].reshape(-1, cfg.grid_size, cfg.grid_size)


def _rollout_maps(model: ViT, inputs: jax.Array) -> jax.Array:
    _, joint = rollout_walk(model, inputs)
    return _to_unit(_resize(rollout_rows(model, joint), inputs.shape[1:3]), subtract_min=True)


# ---- Grad-CAM ----------------------------------------------------------------------------------------------------


@nnx.jit
def gradcam(model: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Grad-CAM (N, h, w) at the feature map's resolution, unscaled: relu(sum_c w_c A_c) with w_c the spatial mean
    of d logit[target] / dA_c; `targets` int32 (N,), -1: the predicted class. Evaluation mode is the caller's."""
    feature_map = model.feature_map(inputs)
    logits, pullback = jax.vjp(model.head_from_map, feature_map)
    chosen = jnp.where(targets < 0, jnp.argmax(logits, axis=-1), targets)
    # Images are independent in evaluation mode, so one pullback of the chosen logits gives every image's gradient.
    (grad,) = pullback(jax.nn.one_hot(chosen, logits.shape[-1], dtype=logits.dtype))
    weights = grad.astype(jnp.float32).mean(axis=(1, 2))
    return jax.nn.relu(jnp.einsum("nhwc,nc->nhw", feature_map.astype(jnp.float32), weights))


def _gradcam_maps(model: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    return _to_unit(_resize(gradcam(model, inputs, targets), inputs.shape[1:3]), subtract_min=False)


# ---- maps and pictures -------------------------------------------------------------------------------------------


def _resize(maps: jax.Array, size: Sequence[int]) -> jax.Array:
    return jax.image.resize(maps.astype(jnp.float32), (maps.shape[0], *size), "bilinear")


def _to_unit(maps: jax.Array, *, subtract_min: bool) -> jax.Array:
    """Each map scaled to [0, 1]; a constant one (no contrast, or a cam of zeros) becomes zeros."""
    low = maps.min(axis=(1, 2), keepdims=True) if subtract_min else jnp.zeros((maps.shape[0], 1, 1), maps.dtype)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    scaled = (maps - low) / jnp.where(span > 0, span, 1.0)
    return jnp.where(span > 0, jnp.clip(scaled, 0.0, 1.0), 0.0)


def overlay(images_uint8: Any, heat: Any, alpha: float = 0.5, *, colormap: str = "jet") -> np.ndarray:
    """The heat maps (N, H, W) in [0, 1], resized bilinearly to the images' size, coloured with the matplotlib
    `colormap` and blended over the images (N, h, w[, 1 or 3]) uint8: (1 - alpha) image + alpha colour, uint8
    (N, h, w, 3). Grayscale images become RGB; an alpha channel is dropped."""
    images = np.asarray(images_uint8)
    heat = np.asarray(heat, np.float32)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise FlaxvisionError(f"overlay needs uint8 images (N, h, w) or (N, h, w, 1 | 3 | 4), got {images.dtype} {images.shape}")
    if heat.ndim != 3 or heat.shape[0] != images.shape[0]:
        raise FlaxvisionError(f"overlay needs one heat map (H, W) per image: {images.shape[0]} images, heat maps of shape {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise FlaxvisionError(f"overlay: alpha must be in [0, 1], got {alpha!r}")
    import matplotlib

    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise FlaxvisionError(f"overlay: unknown matplotlib colormap {colormap!r}; try 'jet', 'inferno' or 'viridis'") from None
    rgb = images if images.ndim == 4 else images[..., None]
    rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb[..., :3]
    h, w = rgb.shape[1:3]
    if heat.shape[1:] != (h, w):
        from PIL import Image

        heat = np.stack([np.asarray(Image.fromarray(m, mode="F").resize((w, h), Image.Resampling.BILINEAR)) for m in heat])
    colours = cmap(np.clip(np.nan_to_num(heat), 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# ---- files (`flaxvision predict --explain`) ----------------------------------------------------------------------


def check_out_dir(out: str | os.PathLike) -> Path:
    """The folder overlays go to, checked before anything runs and without writing: an existing folder, or one
    that can be created, on a writable file system. One FlaxvisionError line otherwise."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FlaxvisionError(f"--out {path} exists and is not a directory; give a directory for the overlays")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FlaxvisionError(f"--out {path} cannot be created: {existing} is not a directory; choose another directory")
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        why = "the file system is read-only" if read_only else "permission denied"
        raise FlaxvisionError(f"--out {path} cannot be written: {why} at {existing}; choose another directory")
    return path


def overlay_names(paths: Sequence[str | os.PathLike], method: str) -> list[str]:
    """File names "<stem>_<method>.png", one per path and all different: a stem met again (same-named images in
    other folders) gets "-2", "-3" ... in the order of `paths`."""
    names: list[str] = []
    taken: set[str] = set()
    for p in paths:
        stem, n = Path(p).stem, 1
        name = f"{stem}_{method}.png"
        while name in taken:
            n += 1
            name = f"{stem}-{n}_{method}.png"
        taken.add(name)
        names.append(name)
    return names


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """One uint8 (h, w, 3) image as a PNG, written atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    try:
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    except OSError as err:
        raise storage_error(err, path) from None
    return write_atomic(path, buffer.getvalue())


class OverlayWriter:
    """`flaxvision predict --explain`: the overlays of batches of images, written to `out` as overlay_names gives.

    Built once the model is loaded: refuses a method the model cannot do, then creates `out`."""

    def __init__(self, model: Any, method: str, out: str | os.PathLike, paths: Sequence[str | os.PathLike]):
        self.model = model
        self.method = check_method(model, method)
        self.names = overlay_names(paths, self.method)
        self.out = make_dirs(out)

    def write(self, inputs: Any, images_uint8: np.ndarray, indices: Sequence[int]) -> list[Path]:
        """Explain `inputs` (model inputs; rows past len(indices) are padding) and write the overlays on
        `images_uint8` (what the model saw, before normalisation) for the images at `indices` of `paths`."""
        heat = explain(self.model, inputs, self.method)[: len(indices)]
        pictures = overlay(images_uint8, heat)
        return [save_png(self.out / self.names[i], picture) for i, picture in zip(indices, pictures, strict=True)]
