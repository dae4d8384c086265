"""The layers of flaxvision's Vision Transformer (`flaxvision.models.vit`): patch embedding, attention (with
EVA-02's rotary position embedding), MLP (plain or SwiGLU), layer scale, attention pooling, the encoder block.
Parameter names follow timm's wherever timm has the part.
`cfg` is a `flaxvision.models.vit_config.ViTConfig` (typed Any: that module imports ACTIVATIONS from here)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvision.errors import ConfigError

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU: transformers' and timm's default
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def _trunc_normal(std: float = 0.02):
    return nnx.initializers.truncated_normal(stddev=std)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches projected to `width` channels.

    Mathematically a VALID convolution with kernel = stride = p (the kernel is stored in that HWIO layout), but
    computed as one (B*N, p*p*C) x (p*p*C, D) matmul: the same numbers, and a plain GEMM on every backend.
    """

    def __init__(self, patch_size: int, in_chans: int, width: int, *, bias: bool = True, dtype, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.dtype = dtype
        fan_in_init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = nnx.Param(fan_in_init(rngs.params(), (patch_size, patch_size, in_chans, width)))
        self.bias = nnx.Param(jnp.zeros((width,))) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch_size
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        out = patches @ kernel
        return out if self.bias is None else out + self.bias[...].astype(self.dtype)[None, None, :]


@functools.lru_cache(maxsize=16)
def rope_tables(grid: int, ref_grid: int | None, head_dim: int, temperature: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos (grid * grid, head_dim) of EVA-02's axial rotary embedding (timm's RotaryEmbeddingCat, in_pixels
    False): head_dim / 4 frequencies 1 / temperature^(i / (head_dim / 4)) times the row and the column index of
    each patch (row-major, "ij"), the row's frequencies first, each value twice (interleaved pairs). With
    `ref_grid` the indices are rescaled to that grid (index / grid * ref_grid), EVA's rule at other image sizes.
    Constants of the config: computed once in float32 with numpy, no parameters."""
    bands = head_dim // 4
    freqs = np.float32(1.0) / np.float32(temperature) ** (np.arange(bands, dtype=np.float32) / np.float32(bands))
    t = np.arange(grid, dtype=np.float32)
    if ref_grid is not None:
        t = t / np.float32(grid) * np.float32(ref_grid)
    rows, cols = np.meshgrid(t, t, indexing="ij")
    angles = np.stack([rows, cols], axis=-1)[..., None] * freqs  # (grid, grid, 2, bands)
    angles = np.repeat(angles.reshape(grid * grid, 2 * bands), 2, axis=-1)
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rope(x: jax.Array, sin: np.ndarray, cos: np.ndarray, prefix: int) -> jax.Array:
    """Rotate the (b, t, heads, head_dim) queries or keys of the patch tokens pairwise (x0, x1) -> (x0 cos - x1 sin,
    x1 cos + x0 sin); the `prefix` tokens (CLS, registers) keep theirs, as in timm's EvaAttention. In float32,
    cast back to x's dtype."""
    body = x[:, prefix:]
    rotated = jnp.stack([-body[..., 1::2], body[..., ::2]], axis=-1).reshape(body.shape)
    out = (body * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)
    return jnp.concatenate([x[:, :prefix], out], axis=1)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection.

    EVA's options: `key_bias=False` keeps biases for the queries and values only (`q_bias`, `v_bias`, timm's
    names; the fused qkv then has none). A key bias cannot simply be left at zero in a fused bias and dropped on
    export: with rotary embeddings it is rotated per position and does change the attention. `rope` rotates q and
    k of the patch tokens; `scale_attn_inner` adds a LayerNorm (`norm`) on the attention output before `proj`.
    """

    def __init__(self, cfg: Any, *, dtype, rngs: nnx.Rngs):
        d = cfg.width
        self.num_heads = cfg.num_heads
        self.qkv = nnx.Linear(d, 3 * d, use_bias=cfg.qkv_bias and cfg.key_bias, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.proj = nnx.Linear(d, d, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.attn_drop = nnx.Dropout(cfg.attention_dropout_rate, rngs=rngs)
        self.proj_drop = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
        head_dim = d // cfg.num_heads
        self.q_norm = _layer_norm(cfg, head_dim, dtype=dtype, rngs=rngs) if cfg.qk_norm else None
        self.k_norm = _layer_norm(cfg, head_dim, dtype=dtype, rngs=rngs) if cfg.qk_norm else None
        separate = cfg.qkv_bias and not cfg.key_bias
        self.q_bias = nnx.Param(jnp.zeros((d,))) if separate else None
        self.v_bias = nnx.Param(jnp.zeros((d,))) if separate else None
        self.norm = _layer_norm(cfg, dtype=dtype, rngs=rngs) if cfg.scale_attn_inner else None
        # Static (grid, reference grid, prefix tokens): the tables are constants of the traced block.
        self.rope = (cfg.grid_size, cfg.rope_ref_grid, cfg.num_prefix_tokens) if cfg.rope else None

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values (b, t, heads, head_dim): biases, qk-norm and rope applied."""
        b, t, d = x.shape
        head_dim = d // self.num_heads
        qkv = self.qkv(x)
        if self.q_bias is not None and self.v_bias is not None:
            q_bias = self.q_bias[...]
            qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), self.v_bias[...]]).astype(qkv.dtype)[None, None, :]
        qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            grid, ref_grid, prefix = self.rope
            sin, cos = rope_tables(grid, ref_grid, head_dim)
            q, k = apply_rope(q, sin, cos, prefix), apply_rope(k, sin, cos, prefix)
        return q, k, v

    def _output(self, out: jax.Array) -> jax.Array:
        """The heads' outputs (b, t, heads, head_dim) -> (b, t, d): merged, sub-LN, projected."""
        b, t = out.shape[:2]
        out = out.reshape(b, t, -1)
        if self.norm is not None:
            out = self.norm(out)
        return self.proj_drop(self.proj(out))

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self._qkv(x)
        if self.attn_drop.rate > 0 and not self.attn_drop.deterministic:
            # Dropout on the attention probabilities needs them materialised; the fused kernel has no dropout.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
            probs = self.attn_drop(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype))
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        else:
            # jax's default implementation is the XLA composition on every platform (jax 0.10: "falls back to
            # xla"), GPUs included: the cuDNN fused kernel needs implementation="cudnn" (tests/test_gpu_lowering.py
            # finds no custom call in the CUDA lowering).
            out = jax.nn.dot_product_attention(q, k, v)
        return self._output(out)

    def with_probs(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The attention's output and its probabilities (b, heads, t, t) in float32, without dropout: what
        attention rollout (`flaxvision.explain`) reads. The output is computed from those probabilities, so it
        equals `__call__`'s in evaluation mode up to rounding (the fused kernel orders its sums differently)."""
        q, k, v = self._qkv(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        return self._output(out), probs


class Mlp(nnx.Module):
    """The block's MLP, `cfg.mlp`: "mlp" fc1 -> act -> fc2 (timm's Mlp); "swiglu" SiLU(fc1_g x) * fc1_x x -> fc2
    (timm's SwiGLU); "swiglu_packed" the same with one fc1 of 2 * mlp_dim, gate first (timm's SwiGLUPacked, GluMlp
    with gate_last=False). `scale_mlp`: a LayerNorm (`norm`) of the hidden activations before fc2 (sub-LN). The
    attention-pool head's MLP is always the plain one (`plain`)."""

    def __init__(self, cfg: Any, *, dtype, rngs: nnx.Rngs, dropout: bool = True, plain: bool = False):
        d, m = cfg.width, cfg.mlp_dim
        self.kind = "mlp" if plain else cfg.mlp
        linear = functools.partial(nnx.Linear, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.fc1 = linear(d, 2 * m if self.kind == "swiglu_packed" else m) if self.kind != "swiglu" else None
        self.fc1_g = linear(d, m) if self.kind == "swiglu" else None
        self.fc1_x = linear(d, m) if self.kind == "swiglu" else None
        self.fc2 = linear(m, d)
        rate = cfg.dropout_rate if dropout else 0.0
        self.drop1 = nnx.Dropout(rate, rngs=rngs)
        self.drop2 = nnx.Dropout(rate, rngs=rngs)
        self.norm = _layer_norm(cfg, m, dtype=dtype, rngs=rngs) if cfg.scale_mlp and not plain else None
        self.act = cfg.act

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.fc1_g is not None and self.fc1_x is not None:
            x = jax.nn.silu(self.fc1_g(x)) * self.fc1_x(x)
        elif self.fc1 is not None and self.kind == "swiglu_packed":
            gate, value = jnp.split(self.fc1(x), 2, axis=-1)
            x = jax.nn.silu(gate) * value
        elif self.fc1 is not None:
            x = ACTIVATIONS[self.act](self.fc1(x))
        x = self.drop1(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop2(self.fc2(x))


def _layer_norm(cfg: Any, features: int | None = None, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance: the fast E[x^2] - E[x]^2 form costs parity with PyTorch's LayerNorm.
    width = features or cfg.width
    return nnx.LayerNorm(width, epsilon=cfg.layer_norm_eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


class LayerScale(nnx.Module):
    """A learned per-channel gain on a residual branch (CaiT; DeiT III and DINOv2 use it), `gamma` as timm names it."""

    def __init__(self, width: int, init_values: float):
        self.gamma = nnx.Param(jnp.full((width,), init_values, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))


class AttentionPool(nnx.Module):
    """Multi-head attention pooling (MAP, SigLIP; timm's AttentionPoolLatent): one learned query attends over every
    token, then a residual MLP: `y = proj(attn(q(latent), kv(x))); y + mlp(norm(y))`."""

    def __init__(self, cfg: Any, *, dtype, rngs: nnx.Rngs):
        d = cfg.width
        self.num_heads = cfg.num_heads
        self.latent = nnx.Param(_trunc_normal(d**-0.5)(rngs.params(), (1, 1, d)))
        self.q = nnx.Linear(d, d, use_bias=cfg.qkv_bias, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.kv = nnx.Linear(d, 2 * d, use_bias=cfg.qkv_bias, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.proj = nnx.Linear(d, d, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.norm = _layer_norm(cfg, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(cfg, dtype=dtype, rngs=rngs, dropout=False, plain=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.num_heads
        latent = jnp.broadcast_to(self.latent[...].astype(x.dtype), (b, 1, d))
        q = self.q(latent).reshape(b, 1, h, d // h)
        kv = self.kv(x).reshape(b, t, 2, h, d // h)
        y = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1]).reshape(b, 1, d)
        y = self.proj(y)
        return (y + self.mlp(self.norm(y)))[:, 0]


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

    def __init__(self, cfg: Any, drop_path_rate: float, *, dtype, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(cfg, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(cfg, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(cfg, dtype=dtype, rngs=rngs)
        # Stochastic depth = dropout of whole samples: one Bernoulli per example, broadcast over tokens/channels.
        self.drop_path1 = nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2), rngs=rngs)
        self.drop_path2 = nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2), rngs=rngs)
        scale = cfg.init_values
        self.ls1 = LayerScale(cfg.width, scale) if scale is not None else None
        self.ls2 = LayerScale(cfg.width, scale) if scale is not None else None

    def _attn(self, x: jax.Array) -> jax.Array:
        y = self.attn(self.norm1(x))
        return y if self.ls1 is None else self.ls1(y)

    def _mlp(self, x: jax.Array) -> jax.Array:
        y = self.mlp(self.norm2(x))
        return y if self.ls2 is None else self.ls2(y)

    def __call__(self, x: jax.Array, drop_path_rate: jax.Array | None = None) -> jax.Array:
        if drop_path_rate is None or self.drop_path1.deterministic:
            x = x + self.drop_path1(self._attn(x))
            return x + self.drop_path2(self._mlp(x))
        rngs1, rngs2 = self.drop_path1.rngs, self.drop_path2.rngs
        if rngs1 is None or rngs2 is None:
            raise ConfigError("stochastic depth in training mode needs the block built with rngs")
        x = x + drop_path(self._attn(x), drop_path_rate, rngs1())
        return x + drop_path(self._mlp(x), drop_path_rate, rngs2())
