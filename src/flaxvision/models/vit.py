"""Vision Transformer (Dosovitskiy et al. 2020) as a Flax NNX module.

One implementation expresses the ViT families people fine-tune: transformers' `ViTForImageClassification`,
timm's `VisionTransformer` and `Eva` and the variants their checkpoints use (DeiT, DeiT III, DINOv2, CLIP, SigLIP,
EVA-02):
pre-LN blocks, learned position embeddings, exact (erf) GELU, configurable LayerNorm epsilon (transformers uses
1e-12, timm and big_vision 1e-6), qkv bias on/off, dropout, drop-path, and the options below, each a field of
`ViTConfig`:
    class_token        a CLS token (off for SigLIP, which pools with attention)
    distilled          DeiT's distillation token and second head (the logits are the mean of both heads)
    reg_tokens         DINOv2's register tokens (extra learned tokens, dropped at pooling)
    no_embed_class     the position embedding covers the patches only (DeiT III, DINOv2 with registers)
    init_values        layer scale: a learned per-channel gain on each residual branch (CaiT, DeiT III, DINOv2)
    qk_norm            LayerNorm of queries and keys per head
    pre_norm           a LayerNorm before the encoder (CLIP)
    patch_bias         a bias in the patch projection (CLIP has none)
    global_pool        "token" (CLS), "avg" (mean of the patch tokens), "map" (attention pooling, SigLIP),
                       "token_avg" (CLS and patch mean concatenated: transformers' Dinov2ForImageClassification)
    mlp                "mlp" (fc1, act, fc2), "swiglu" (SiLU(fc1_g x) * fc1_x x, then fc2: timm's SwiGLU, EVA-02 base),
                       "swiglu_packed" (one fc1 of 2 x mlp_dim, gate half first: timm's SwiGLUPacked / GluMlp,
                       EVA-02 tiny and small, DINOv2 giant); mlp_dim is the gated width, fc2's input
    scale_attn_inner   sub-LN: a LayerNorm on the attention output before its projection (timm Eva's attn.norm)
    scale_mlp          sub-LN: a LayerNorm on the MLP's hidden activations before fc2 (timm's mlp.norm, EVA-02 base)
    key_bias           False: biases for queries and values only (EVA; q_bias and v_bias instead of qkv.bias)
    rope               EVA-02's rotary position embedding of q and k (patch tokens only; no parameters), on top of
                       the learned position embedding
    rope_ref_grid      the grid the rotary positions are scaled to (timm's ref_feat_shape, EVA-02: 16): at another
                       image size patch index i becomes i / grid * rope_ref_grid; None: unscaled indices

Layout of the parameters (what the weight converters map to; timm's names wherever timm has the part):
    patch_embed.kernel (p, p, C, D), patch_embed.bias (D,)   -- a stride-p convolution, computed as a matmul
    cls_token (1, 1, D), dist_token (1, 1, D), reg_token (1, R, D)   -- in this order before the patches
    pos_embed (1, prefix + num_patches, D)  -- prefix = the tokens above, or 0 with no_embed_class
    norm_pre
    blocks[i].norm1, blocks[i].attn.qkv (D, 3D) [q | k | v, heads major], blocks[i].attn.q_norm / k_norm,
    blocks[i].attn.q_bias / v_bias (D,) (key_bias=False: qkv has no bias then), blocks[i].attn.norm (sub-LN),
    blocks[i].attn.proj (D, D), blocks[i].ls1.gamma (D,), blocks[i].norm2, blocks[i].mlp.fc1 (D, M),
    or blocks[i].mlp.fc1_g / fc1_x (D, M) (swiglu), or blocks[i].mlp.fc1 (D, 2M) [gate | value] (swiglu_packed),
    blocks[i].mlp.norm (M,) (sub-LN), blocks[i].mlp.fc2 (M, D), blocks[i].ls2.gamma
    norm (before pooling, or after it when fc_norm)
    attn_pool.latent (1, 1, D), attn_pool.q (D, D), attn_pool.kv (D, 2D), attn_pool.proj, attn_pool.norm,
    attn_pool.mlp.fc1 / fc2                                    -- the "map" head (timm's AttentionPoolLatent)
    head (D or 2D, num_classes), head_dist (D, num_classes)
Inputs are NHWC float images, normalised with the model's mean and std.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from flaxvision.models.base import Classifier, compute_dtype
from flaxvision.models.registry import register_family, register_model
from flaxvision.models.vit_config import REMAT_POLICIES, ViTConfig
from flaxvision.models.vit_layers import AttentionPool, Block, PatchEmbed, _layer_norm, _trunc_normal
from flaxvision.preprocessing import HALF


class ViT(Classifier):
    """Vision Transformer classifier. `ViT(ViTConfig.base(num_classes=10), rngs=nnx.Rngs(0))(images)`."""

    family: ClassVar[str] = "vit"

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = compute_dtype(config.dtype)
        d = config.width
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, d, bias=config.patch_bias, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, d))) if config.class_token else None
        self.dist_token = nnx.Param(_trunc_normal()(rngs.params(), (1, 1, d))) if config.distilled else None
        self.reg_token = nnx.Param(_trunc_normal(1e-6)(rngs.params(), (1, config.reg_tokens, d))) if config.reg_tokens else None
        positions = config.num_patches + config.pos_prefix_tokens
        self.pos_embed = nnx.Param(_trunc_normal()(rngs.params(), (1, positions, d)))
        self.pos_drop = nnx.Dropout(config.dropout_rate, rngs=rngs)
        self.norm_pre = _layer_norm(config, dtype=dtype, rngs=rngs) if config.pre_norm else None
        # Drop-path rate grows linearly with depth, as in DeiT and timm.
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nnx.List([Block(config, r, dtype=dtype, rngs=rngs) for r in rates])
        self.norm = _layer_norm(config, dtype=dtype, rngs=rngs)
        self.attn_pool = AttentionPool(config, dtype=dtype, rngs=rngs) if config.global_pool == "map" else None
        c = config.num_classes
        self.head = nnx.Linear(config.head_features, c, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs)
        self.head_dist = nnx.Linear(d, c, dtype=dtype, kernel_init=_trunc_normal(), rngs=rngs) if config.distilled else None

    def tokens(self, x: jax.Array) -> jax.Array:
        """Encoder output for every token, (B, num_prefix_tokens + num_patches, width): CLS, distillation and
        register tokens first (those the config has). Final norm applied unless fc_norm."""
        x = self._encoder(self.embed(x))
        return x if self.config.use_fc_norm else self.norm(x)

    def embed(self, x: jax.Array) -> jax.Array:
        """The encoder's input, (B, num_tokens, width): patch embeddings after the prefix tokens, position
        embedding, dropout, pre-norm (CLIP)."""
        self.check_input(x)
        x = self.patch_embed(x)
        pos = self.pos_embed[...].astype(x.dtype)
        prefix = [jnp.broadcast_to(t[...].astype(x.dtype), (x.shape[0], *t.shape[1:]))
                  for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]  # fmt: skip
        if self.config.no_embed_class:  # positions for the patches only; the prefix tokens have none
            x = jnp.concatenate([*prefix, x + pos], axis=1)
        else:
            x = jnp.concatenate([*prefix, x], axis=1) + pos
        x = self.pos_drop(x)
        return x if self.norm_pre is None else self.norm_pre(x)

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
        """Pooled image embedding fed to the head, (B, head_features); DeiT distilled: (B, 2, width), both tokens."""
        return self._pool(self.tokens(x))

    def _pool(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        patches = x[:, cfg.num_prefix_tokens :]
        if cfg.global_pool == "avg":
            x = patches.mean(axis=1)
        elif cfg.global_pool == "map" and self.attn_pool is not None:
            x = self.attn_pool(x)
        elif cfg.global_pool == "token_avg":
            x = jnp.concatenate([x[:, 0], patches.mean(axis=1)], axis=-1)
        else:
            x = x[:, :2] if cfg.distilled else x[:, 0]
        return self.norm(x) if cfg.use_fc_norm else x

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (B, num_classes) in float32 for NHWC images (B, img_size, img_size, in_chans).

        DeiT distilled: the mean of the class head on the CLS token and the distillation head on its token (what
        DeiT reports at evaluation; fine-tuning without a teacher trains both heads on the labels)."""
        return self.head_from_tokens(self.tokens(x))

    def head_from_tokens(self, tokens: jax.Array) -> jax.Array:
        """Logits (B, num_classes) in float32 from the encoder's tokens (what `tokens(x)` returns): pooled, head."""
        features = self._pool(tokens)
        if self.head_dist is not None:
            return ((self.head(features[:, 0]) + self.head_dist(features[:, 1])) / 2).astype(jnp.float32)
        return self.head(features).astype(jnp.float32)


register_family(ViTConfig, ViT, mean=HALF, std=HALF)  # google/vit-* and the ViT tutorial: pixels in [-1, 1]
for _size, (_make, _label) in {"tiny": (ViTConfig.tiny, "ViT-Ti (DeiT-Tiny)"), "small": (ViTConfig.small, "ViT-S"),
                               "base": (ViTConfig.base, "ViT-B"), "large": (ViTConfig.large, "ViT-L")}.items():  # fmt: skip
    for _patch in (16, 32):
        register_model(f"vit_{_size}_patch{_patch}_224", _make(patch=_patch), f"{_label}/{_patch}, 224 px, CLS-token head")
