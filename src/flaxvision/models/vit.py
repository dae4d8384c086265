"""Vision Transformer (Dosovitskiy et al. 2020) as a Flax NNX module.

One implementation expresses both transformers' `ViTForImageClassification` and timm's `VisionTransformer`:
pre-LN blocks, a CLS token, learned position embeddings, exact (erf) GELU, configurable LayerNorm epsilon
(transformers uses 1e-12, timm and big_vision 1e-6), qkv bias on/off, dropout, drop-path, and a CLS-token or
global-average-pool head (with timm's `fc_norm` placement of the final norm for average pooling).

Layout of the parameters (what the weight converters map to):
    patch_embed.kernel (p, p, C, D), patch_embed.bias (D,)   -- a stride-p convolution, computed as a matmul
    cls_token (1, 1, D), pos_embed (1, num_patches + 1, D)
    blocks[i].norm1, blocks[i].attn.qkv (D, 3D) [q | k | v, heads major], blocks[i].attn.proj (D, D)
    blocks[i].norm2, blocks[i].mlp.fc1 (D, M), blocks[i].mlp.fc2 (M, D)
    norm (before pooling, or after it when fc_norm), head (D, num_classes)
Inputs are NHWC float images, normalised with the model's mean and std.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvision.errors import ConfigError
from flaxvision.models.base import Classifier, ConfigBase, check_common, compute_dtype, train_step_bytes
from flaxvision.models.registry import register_family, register_model
from flaxvision.preprocessing import HALF

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU: transformers' and timm's default
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}
GLOBAL_POOLS = ("token", "avg")
# What the backward pass keeps of each encoder block (jax.checkpoint policies; None: everything).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True, slots=True)
class ViTConfig(ConfigBase):
    """Architecture of a Vision Transformer. Presets: `ViTConfig.base(patch=16)` etc."""

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    act: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    global_pool: str = "token"
    fc_norm: bool | None = None  # None: timm's rule, norm after pooling exactly when global_pool == "avg"
    dtype: str = "float32"
    # How the encoder trains (not which weights it has). `scan_blocks`: one compiled block scanned over the depth,
    # which compiles in a fraction of the time of the unrolled loop and keeps XLA from fusing the residual
    # stream's gradient across blocks (evaluation, with no backward pass, runs unrolled). `remat`: what the
    # backward pass keeps of each block: "none" every activation, "dots" the matmul outputs (recomputing layer
    # norms, softmax and GELU; as fast here and 1.2 GB less for ViT-B/16 at batch 8), "full" only the block
    # inputs (recomputes the whole forward pass: least memory, ~15% slower).
    scan_blocks: bool = True
    remat: str = "dots"

    def __post_init__(self) -> None:
        check_common(self)
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ConfigError(f"ViTConfig: patch_size must be a positive integer, got {self.patch_size!r}")
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"ViTConfig: img_size {self.img_size} is not divisible by patch_size {self.patch_size}; "
                f"use a multiple of {self.patch_size} such as {max(1, round(self.img_size / self.patch_size)) * self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ConfigError(f"ViTConfig: width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"ViTConfig: act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"ViTConfig: global_pool must be one of {', '.join(GLOBAL_POOLS)}, got {self.global_pool!r}")
        for field in ("dropout_rate", "attention_dropout_rate", "drop_path_rate"):
            rate = getattr(self, field)
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"ViTConfig: {field} must be in [0, 1), got {rate!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"ViTConfig: remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.depth < 1 or self.layer_norm_eps <= 0:
            raise ConfigError(f"ViTConfig: depth must be >= 1 and layer_norm_eps > 0, got {self.depth}, {self.layer_norm_eps}")

    # Sizes from the ViT paper (Ti and S from DeiT); patch 16 or 32.
    @classmethod
    def tiny(cls, patch: int = 16, **kw) -> ViTConfig:
        return cls(patch_size=patch, width=192, depth=12, num_heads=3, mlp_dim=768, **kw)

    @classmethod
    def small(cls, patch: int = 16, **kw) -> ViTConfig:
        return cls(patch_size=patch, width=384, depth=12, num_heads=6, mlp_dim=1536, **kw)

    @classmethod
    def base(cls, patch: int = 16, **kw) -> ViTConfig:
        return cls(patch_size=patch, width=768, depth=12, num_heads=12, mlp_dim=3072, **kw)

    @classmethod
    def large(cls, patch: int = 16, **kw) -> ViTConfig:
        return cls(patch_size=patch, width=1024, depth=24, num_heads=16, mlp_dim=4096, **kw)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def param_count(self) -> int:
        """Trainable parameters, from the config alone (tests check it against the built model)."""
        d, m = self.width, self.mlp_dim
        embed = self.patch_size**2 * self.in_chans * d + d + d + (self.num_patches + 1) * d
        per_block = 4 * d + 3 * d * d + (3 * d if self.qkv_bias else 0) + d * d + d + 2 * d * m + m + d
        return embed + self.depth * per_block + 2 * d + d * self.num_classes + self.num_classes

    def forward_flops(self) -> int:
        """2 x multiply-adds of the patch projection, all attention and MLP matmuls, and the head."""
        tokens, d = self.num_patches + 1, self.width
        patch = self.num_patches * self.patch_size**2 * self.in_chans * d
        per_block = tokens * (3 * d * d + d * d + 2 * d * self.mlp_dim) + 2 * tokens * tokens * d
        return 2 * (patch + self.depth * per_block + d * self.num_classes)

    # ---- capabilities (flaxvision.models.base.ModelConfig) ----

    def num_layers(self) -> int:
        return self.depth

    def layer_index(self, path: str) -> int:
        """BEiT's layer ids: embeddings 0, block i -> i + 1, the final norm and the head depth + 1."""
        top, _, rest = path.partition(".")
        if top in ("patch_embed", "cls_token", "pos_embed"):
            return 0
        if top == "blocks":
            return int(rest.split(".", 1)[0]) + 1
        return self.depth + 1

    def position_grid(self) -> int | None:
        return self.grid_size

    def train_memory_bytes(self, batch_size: int, *, optimizer_slots: int = 2) -> int:
        """Device memory of one training step, estimated: within ~2x of XLA's (tests check it).

        Activations the backward pass keeps, per token and block: "dots" keeps the matmul outputs (qkv, the
        attention scores, the attention output, proj, fc1, fc2) and the block input, "none" about twice that
        (layer norms, softmax, GELU), "full" the block input only; plus one block's worth for the backward pass
        itself. XLA's attention materialises the (heads, T, T) scores, which dominate at many tokens (ViT-Ti
        with 3,137 tokens needs tens of GB at batch 32); a fused (flash) kernel needs less than estimated.
        """
        tokens, d, m = self.num_patches + 1, self.width, self.mlp_dim
        scores = self.num_heads * tokens
        everything = 11 * d + 3 * m + 3 * scores
        per_block = {"none": everything, "dots": 7 * d + m + scores, "full": d}[self.remat]
        itemsize = jnp.dtype(compute_dtype(self.dtype)).itemsize
        activations = batch_size * tokens * (self.depth * per_block + everything) * itemsize
        inputs = batch_size * self.img_size**2 * self.in_chans * 4
        return train_step_bytes(self.param_count(), optimizer_slots, activations + inputs)


def _trunc_normal(std: float = 0.02):
    return nnx.initializers.truncated_normal(stddev=std)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches projected to `width` channels.

    Mathematically a VALID convolution with kernel = stride = p (the kernel is stored in that HWIO layout), but
    computed as one (B*N, p*p*C) x (p*p*C, D) matmul: the same numbers, and a plain GEMM on every backend.
    """

    def __init__(self, patch_size: int, in_chans: int, width: int, *, dtype, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.dtype = dtype
        fan_in_init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = nnx.Param(fan_in_init(rngs.params(), (patch_size, patch_size, in_chans, width)))
        self.bias = nnx.Param(jnp.zeros((width,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch_size
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        return patches @ kernel + self.bias[...].astype(self.dtype)[None, None, :]


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.width
        self.num_heads = cfg.num_heads
        self.qkv = nnx.Linear(d, 3 * d, use_bias=cfg.qkv_bias, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.proj = nnx.Linear(d, d, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.attn_drop = nnx.Dropout(cfg.attention_dropout_rate, rngs=rngs)
        self.proj_drop = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.attn_drop.rate > 0 and not self.attn_drop.deterministic:
            # Dropout on the attention probabilities needs them materialised; the fused kernel has no dropout.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
            probs = self.attn_drop(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype))
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        else:
            # Picks cuDNN flash attention on GPUs, the XLA composition elsewhere.
            out = jax.nn.dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(out.reshape(b, t, d)))


class Mlp(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(cfg.width, cfg.mlp_dim, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.fc2 = nnx.Linear(cfg.mlp_dim, cfg.width, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.drop1 = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
        self.drop2 = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
        self.act = cfg.act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.drop2(self.fc2(self.drop1(ACTIVATIONS[self.act](self.fc1(x)))))


def _layer_norm(cfg: ViTConfig, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance: the fast E[x^2] - E[x]^2 form costs parity with PyTorch's LayerNorm.
    return nnx.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
    """Stochastic depth with a traced rate: drop whole samples, as nnx.Dropout(rate, broadcast_dims=(1, 2))."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class Block(nnx.Module):
    """Pre-LN encoder block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

    `drop_path_rate`, when given, replaces the block's own rate (a traced value: the scanned encoder passes each
    block's rate as data, so that one compiled body serves blocks whose rates differ).
    """

    def __init__(self, cfg: ViTConfig, drop_path_rate: float, *, dtype, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(cfg, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(cfg, dtype=dtype, rngs=rngs)
        # Stochastic depth = dropout of whole samples: one Bernoulli per example, broadcast over tokens/channels.
        self.drop_path1 = nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2), rngs=rngs)
        self.drop_path2 = nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2), rngs=rngs)

    def __call__(self, x: jax.Array, drop_path_rate: jax.Array | None = None) -> jax.Array:
        if drop_path_rate is None or self.drop_path1.deterministic:
            x = x + self.drop_path1(self.attn(self.norm1(x)))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        rngs1, rngs2 = self.drop_path1.rngs, self.drop_path2.rngs
        if rngs1 is None or rngs2 is None:
            raise ConfigError("stochastic depth in training mode needs the block built with rngs")
        x = x + drop_path(self.attn(self.norm1(x)), drop_path_rate, rngs1())
        return x + drop_path(self.mlp(self.norm2(x)), drop_path_rate, rngs2())


class ViT(Classifier):
    """Vision Transformer classifier. `ViT(ViTConfig.base(num_classes=10), rngs=nnx.Rngs(0))(images)`."""

    family: ClassVar[str] = "vit"

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = compute_dtype(config.dtype)
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.width, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, config.width)))
        self.pos_embed = nnx.Param(_trunc_normal()(rngs.params(), (1, config.num_patches + 1, config.width)))
        self.pos_drop = nnx.Dropout(config.dropout_rate, rngs=rngs)
        # Drop-path rate grows linearly with depth, as in DeiT and timm.
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nnx.List([Block(config, r, dtype=dtype, rngs=rngs) for r in rates])
        self.norm = _layer_norm(config, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(config.width, config.num_classes, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)

    def tokens(self, x: jax.Array) -> jax.Array:
        """Encoder output for every token, (B, 1 + num_patches, width); CLS first. Final norm applied unless fc_norm."""
        self.check_input(x)
        x = self.patch_embed(x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        x = self.pos_drop(x)
        x = self._encoder(x)
        return x if self.config.use_fc_norm else self.norm(x)

    def _encoder(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        training = not self.blocks[0].drop_path1.deterministic
        policy = REMAT_POLICIES[cfg.remat]
        if not (cfg.scan_blocks and training) or cfg.depth == 1:
            # Unrolled: evaluation (no backward pass; ~4% faster than the scan and still compiles in ~1 s for
            # ViT-B/16), or scan_blocks=False.
            for block in self.blocks:
                if training and cfg.remat != "none":
                    x = nnx.remat(lambda blk, y: blk(y), policy=policy, prevent_cse=False)(block, x)
                else:
                    x = block(x)
            return x
        # Scan one block over the depth. The parameters keep their per-block layout (what checkpoints, freezing
        # and layer-wise decay address); they are stacked here, inside the compiled step, which costs one copy of
        # the encoder weights (a few percent of a step) and compiles the block once instead of `depth` times.
        # nnx.scan would need them stacked in the module itself; this keeps the module layout unchanged.
        graph, _ = nnx.split(self.blocks[0])
        states = [nnx.state(block) for block in self.blocks]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        rates = jnp.asarray([blk.drop_path1.rate for blk in self.blocks], jnp.float32)
        use_rates = cfg.drop_path_rate > 0
        stochastic = use_rates or cfg.dropout_rate > 0 or cfg.attention_dropout_rate > 0

        def body(carry: jax.Array, layer: tuple) -> tuple[jax.Array, nnx.State | None]:
            state, rate = layer
            block = nnx.merge(graph, state)
            carry = block(carry, rate if use_rates else None)
            # Hand back the advanced RNG counters so that the next call draws new dropout masks.
            return carry, nnx.state(block, nnx.RngState) if stochastic else None

        if cfg.remat != "none":
            body = jax.checkpoint(body, prevent_cse=False, policy=policy)
        x, rng_states = jax.lax.scan(body, x, (stacked, rates))
        if stochastic:
            for i, block in enumerate(self.blocks):
                nnx.update(block, jax.tree.map(lambda leaf, i=i: leaf[i], rng_states))
        return x

    def features(self, x: jax.Array) -> jax.Array:
        """Pooled image embedding fed to the head, (B, width)."""
        x = self.tokens(x)
        x = x[:, 1:].mean(axis=1) if self.config.global_pool == "avg" else x[:, 0]
        return self.norm(x) if self.config.use_fc_norm else x

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (B, num_classes) in float32 for NHWC images (B, img_size, img_size, in_chans)."""
        return self.head(self.features(x)).astype(jnp.float32)


register_family(ViTConfig, ViT, mean=HALF, std=HALF)  # google/vit-* and the ViT tutorial: pixels in [-1, 1]
for _size, (_make, _label) in {"tiny": (ViTConfig.tiny, "ViT-Ti (DeiT-Tiny)"), "small": (ViTConfig.small, "ViT-S"),
                               "base": (ViTConfig.base, "ViT-B"), "large": (ViTConfig.large, "ViT-L")}.items():  # fmt: skip
    for _patch in (16, 32):
        register_model(f"vit_{_size}_patch{_patch}_224", _make(patch=_patch), f"{_label}/{_patch}, 224 px, CLS-token head")
