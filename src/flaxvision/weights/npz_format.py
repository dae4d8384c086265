"""Google's original ViT weights: NumPy .npz archives from google-research/vision_transformer and big_vision.

Keys are '/'-joined Flax paths, kernels already (in, out) and the patch kernel already HWIO:
    embedding/kernel (p, p, C, D), cls (1, 1, D), Transformer/posembed_input/pos_embedding (1, 1 + g*g, D)
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value}/kernel (D, H, d),
        .../out/kernel (H, d, D), LayerNorm_2, MlpBlock_3/Dense_{0,1}
    Transformer/encoder_norm, head/kernel (D, classes)
Read as well: the prefixes 'opt/target/' and 'params/' (big_vision), big_vision's sub-module numbering
(MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0), its top-level `pos_embedding` without a CLS position,
and blocks stacked along a leading depth axis (`Transformer/encoderblock/...`, from nn.scan).
Written: the vision_transformer layout above, which timm's `_load_weights` reads. These files carry no
config: LayerNorm eps is 1e-6, preprocessing is big_vision's (squash resize, bilinear, mean = std = 0.5).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from flaxvision.errors import FlaxvisionError
from flaxvision.models.vit import ViTConfig
from flaxvision.preprocessing import HALF, Preprocessing
from flaxvision.weights.convert import Parsed, Rule, copy, export, fused, grid_of, import_params, require
from flaxvision.weights.hub import WeightFiles

logger = logging.getLogger(__name__)

FORMAT = "npz"
FAMILY = "ViT (vision_transformer / big_vision .npz)"
PREFIXES = ("opt/target/", "params/img/", "params/")
BLOCK = "Transformer/encoderblock_{}/"
STACKED = "Transformer/encoderblock/"
POS = "Transformer/posembed_input/pos_embedding"
# big_vision numbers a block's sub-modules 0, 0, 1, 0; vision_transformer 0, 1, 2, 3.
BIG_VISION_NAMES = (("MultiHeadDotProductAttention_0/", "MultiHeadDotProductAttention_1/"),
                    ("LayerNorm_1/", "LayerNorm_2/"), ("MlpBlock_0/", "MlpBlock_3/"))  # fmt: skip


def is_layout(keys: Any) -> bool:
    return any(k.endswith("embedding/kernel") for k in keys)


def detect(weights: WeightFiles) -> bool:
    config = weights.config or {}
    return "model_type" not in config and "architecture" not in config and is_layout(weights.tensors.keys())


def exports(config: Any) -> bool:
    return isinstance(config, ViTConfig) and refusal(config) is None


HOLDS = {"qkv_bias", "layer_norm_eps", "act", "fc_norm"}  # the ViTConfig options this layout can carry


def refusal(config: Any) -> str | None:
    if not isinstance(config, ViTConfig):
        return None
    if config.global_pool != "token" or config.use_fc_norm:
        return f"the .npz layout has a CLS-token head with encoder_norm before it, this model has global_pool={config.global_pool!r}"
    extra = {k: v for k, v in config.options().items() if k not in HOLDS}
    if extra:
        return f"the .npz layout holds a plain ViT, this model has {', '.join(f'{k}={v!r}' for k, v in extra.items())}"
    return None


def rules(config: ViTConfig, *, head: bool = True) -> list[Rule]:
    """Their tensors <-> flaxvision mapping in the vision_transformer layout."""
    d, h = config.width, config.num_heads

    def heads_in(k: np.ndarray) -> np.ndarray:  # (D, H, d) -> (D, D), heads major like the fused kernel
        return k.reshape(d, d)

    def heads_out(k: np.ndarray) -> np.ndarray:
        return k.reshape(d, h, d // h)

    out = [
        copy("embedding/kernel", "patch_embed.kernel"),
        copy("embedding/bias", "patch_embed.bias"),
        copy("cls", "cls_token"),
        copy(POS, "pos_embed"),
    ]
    for i in range(config.depth):
        src, dst = BLOCK.format(i), f"blocks.{i}."
        mha = f"{src}MultiHeadDotProductAttention_1/"
        qkv = [f"{mha}{name}" for name in ("query", "key", "value")]
        out += [
            copy(f"{src}LayerNorm_0/scale", f"{dst}norm1.scale"),
            copy(f"{src}LayerNorm_0/bias", f"{dst}norm1.bias"),
            fused(tuple(f"{k}/kernel" for k in qkv), f"{dst}attn.qkv.kernel", heads_in, heads_out, axis=1),
        ]
        if config.qkv_bias:
            biases = tuple(f"{k}/bias" for k in qkv)
            out.append(fused(biases, f"{dst}attn.qkv.bias", lambda b: b.reshape(d), lambda b: b.reshape(h, d // h), axis=0))
        out += [
            Rule((f"{mha}out/kernel",), f"{dst}attn.proj.kernel", lambda k: k.reshape(d, d), lambda k: (k.reshape(h, d // h, d),)),
            copy(f"{mha}out/bias", f"{dst}attn.proj.bias"),
            copy(f"{src}LayerNorm_2/scale", f"{dst}norm2.scale"),
            copy(f"{src}LayerNorm_2/bias", f"{dst}norm2.bias"),
            copy(f"{src}MlpBlock_3/Dense_0/kernel", f"{dst}mlp.fc1.kernel"),
            copy(f"{src}MlpBlock_3/Dense_0/bias", f"{dst}mlp.fc1.bias"),
            copy(f"{src}MlpBlock_3/Dense_1/kernel", f"{dst}mlp.fc2.kernel"),
            copy(f"{src}MlpBlock_3/Dense_1/bias", f"{dst}mlp.fc2.bias"),
        ]
    out += [copy("Transformer/encoder_norm/scale", "norm.scale"), copy("Transformer/encoder_norm/bias", "norm.bias")]
    if head:
        out += [copy("head/kernel", "head.kernel"), copy("head/bias", "head.bias")]
    return out


def normalise(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Rewrite any supported variant into the vision_transformer layout; returns (tensors, keys left out).

    Keys outside the model's prefix (an 'opt/target/' file's optimizer state, a big_vision two-tower
    model's text tower) are left out and reported.
    """
    prefix = next((p for p in PREFIXES if f"{p}embedding/kernel" in tensors), "")
    outside = tuple(k for k in tensors if not k.startswith(prefix))
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    big_vision = prefix.startswith("params/") or "pos_embedding" in out or f"{STACKED}LayerNorm_0/scale" in out
    stacked = {k: out.pop(k) for k in [k for k in out if k.startswith(STACKED)]}
    for key, value in stacked.items():  # nn.scan stacks blocks along axis 0
        if value.ndim == 0:
            raise FlaxvisionError(f"'{key}' is a 0-d array; a stacked (nn.scan) block parameter has the depth as its first axis")
        for i, block in enumerate(value):
            out[BLOCK.format(i) + key[len(STACKED):]] = block
    if big_vision:
        renamed = {}
        for key, value in out.items():
            if key.startswith("Transformer/encoderblock_"):
                for old, new in BIG_VISION_NAMES:
                    key = key.replace(old, new)
            renamed[key] = value
        out = renamed
        if "pos_embedding" in out:
            out[POS] = out.pop("pos_embedding")
    if "cls" in out and POS in out and out[POS].ndim >= 2:
        tokens = out[POS].shape[-2]
        if round(tokens**0.5) ** 2 == tokens:  # big_vision adds positions before the CLS token: it has none
            pos = out[POS].reshape(1, tokens, -1)
            out[POS] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    return out, outside


def to_flaxvision(tensors: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """Their tensor dict (any supported variant) -> flaxvision flat dict."""
    tensors, _ = normalise(tensors)
    return import_params(rules(config, head="head/kernel" in tensors), tensors)


def check_exportable(config: ViTConfig) -> None:
    """Raise when the .npz layout cannot hold this architecture."""
    reason = refusal(config)
    if reason:
        raise FlaxvisionError(f"{reason}; export it with format='timm' or 'flaxvision'")


def from_flaxvision(params: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """flaxvision flat dict -> vision_transformer .npz dict (zero q/k/v biases for a qkv_bias=False model)."""
    check_exportable(config)
    out = export(rules(config), params)
    if not config.qkv_bias:  # big_vision / timm's npz reader always have q/k/v biases; zeros are the same model
        for i in range(config.depth):
            for name in ("query", "key", "value"):
                out[f"{BLOCK.format(i)}MultiHeadDotProductAttention_1/{name}/bias"] = np.zeros(
                    (config.num_heads, config.width // config.num_heads), np.float32
                )
    if config.layer_norm_eps != 1e-6:
        logger.warning(".npz weights imply LayerNorm eps 1e-6; this model's %g is not stored", config.layer_norm_eps)
    return out


def parse(weights: WeightFiles) -> Parsed:
    """Architecture (from shapes: .npz files carry no config), rules and metadata of ViT .npz weights."""
    what = f".npz weights '{weights.origin}'"
    try:
        tensors, outside = normalise(weights.tensors)
    except FlaxvisionError as err:
        raise FlaxvisionError(f"{what}: {err}") from None
    scalars = sorted(k for k, v in tensors.items() if v.ndim == 0)
    if scalars:
        raise FlaxvisionError(f"{what}: {', '.join(scalars[:4])} is a 0-d array; every ViT parameter has at least one axis")
    for key in tensors:
        if key.startswith("pre_logits/"):
            raise FlaxvisionError(f"{what}: the pre_logits representation layer ('{key}') is not supported by flaxvision's ViT")
        if key.startswith("MAPHead"):
            raise FlaxvisionError(f"{what}: attention pooling (MAPHead) is not supported by flaxvision's ViT")
    if "cls" not in tensors:
        raise FlaxvisionError(f"{what}: weights without a CLS token ('cls'), e.g. pool_type='gap', are not supported")

    def get(key: str, ndim: int = 2) -> np.ndarray:
        return require(tensors, key, what, ndim)

    kernel = get("embedding/kernel", 4)  # (p, p, C, D)
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise FlaxvisionError(f"{what}: embedding/kernel of shape {kernel.shape} is not a square patch convolution")
    patch, in_chans, width = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    depth = 1 + max((int(m.group(1)) for k in tensors if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))), default=-1)
    query = get(BLOCK.format(0) + "MultiHeadDotProductAttention_1/query/kernel", 3)  # (D, H, d)
    has_head = "head/kernel" in tensors
    config = ViTConfig(
        num_classes=get("head/kernel").shape[-1] if has_head else 1,
        img_size=grid_of(get(POS), 1, what) * patch,
        patch_size=patch,
        in_chans=in_chans,
        width=width,
        depth=depth,
        num_heads=query.shape[1],
        mlp_dim=get(BLOCK.format(0) + "MlpBlock_3/Dense_0/kernel").shape[-1],
        qkv_bias=BLOCK.format(0) + "MultiHeadDotProductAttention_1/query/bias" in tensors,
        layer_norm_eps=1e-6,
    )
    return Parsed(
        format="npz",
        tensors=tensors,
        config=config,
        rules=rules(config, head=has_head),
        has_head=has_head,
        preprocessing=Preprocessing(img_size=config.img_size, mean=HALF, std=HALF, resize_mode="squash", interpolation="bilinear"),
        ignored=outside,
    )
