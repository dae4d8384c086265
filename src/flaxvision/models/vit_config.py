"""`ViTConfig`: the architecture of a Vision Transformer (`flaxvision.models.vit`), every option a field."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flaxvision.errors import ConfigError
from flaxvision.models.base import ConfigBase, check_common, compute_dtype, train_step_bytes
from flaxvision.models.registry import RUN_FIELDS
from flaxvision.models.vit_layers import ACTIVATIONS

GLOBAL_POOLS = ("token", "avg", "map", "token_avg")
MLPS = ("mlp", "swiglu", "swiglu_packed")
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
    class_token: bool = True
    distilled: bool = False
    reg_tokens: int = 0
    no_embed_class: bool = False
    init_values: float | None = None
    qk_norm: bool = False
    pre_norm: bool = False
    patch_bias: bool = True
    mlp: str = "mlp"  # "swiglu" / "swiglu_packed": gated, SiLU; mlp_dim is the gated width (fc2's input)
    scale_attn_inner: bool = False
    scale_mlp: bool = False
    key_bias: bool = True
    rope: bool = False
    rope_ref_grid: int | None = None
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
        self._check_tokens()
        self._check_eva()

    def _check_eva(self) -> None:
        """EVA-02's options: the gated MLP, sub-LN, query/value biases only and rotary embeddings."""
        if self.mlp not in MLPS:
            raise ConfigError(f"ViTConfig: mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        if not self.key_bias and not self.qkv_bias:
            raise ConfigError("ViTConfig: key_bias=False (query and value biases only) needs qkv_bias=True")
        if self.rope and (self.width // self.num_heads) % 4:
            raise ConfigError(f"ViTConfig: rope needs a head size divisible by 4, got width {self.width} / "
                              f"{self.num_heads} heads = {self.width // self.num_heads}")  # fmt: skip
        ref = self.rope_ref_grid
        if ref is not None and (not self.rope or not isinstance(ref, int) or isinstance(ref, bool) or not 1 <= ref <= 1024):
            raise ConfigError(f"ViTConfig: rope_ref_grid must be None or an integer from 1 to 1024 with rope=True, got {ref!r} (rope={self.rope})")

    def _check_tokens(self) -> None:
        """The token and pooling options that only make sense together."""
        if self.global_pool in ("token", "token_avg") and not self.class_token:
            raise ConfigError(f"ViTConfig: global_pool={self.global_pool!r} pools the CLS token, but class_token=False; "
                              "use global_pool='avg' or 'map'")  # fmt: skip
        if self.distilled and (not self.class_token or self.global_pool != "token"):
            raise ConfigError("ViTConfig: distilled=True (DeiT's distillation token) needs class_token=True and global_pool='token'")
        if not isinstance(self.reg_tokens, int) or isinstance(self.reg_tokens, bool) or not 0 <= self.reg_tokens <= 64:
            raise ConfigError(f"ViTConfig: reg_tokens must be an integer from 0 to 64, got {self.reg_tokens!r}")
        if self.init_values is not None and not (isinstance(self.init_values, (int, float)) and 0 < self.init_values <= 10):
            raise ConfigError(f"ViTConfig: init_values (layer scale) must be None or in (0, 10], got {self.init_values!r}")
        if self.global_pool == "map" and self.use_fc_norm:
            raise ConfigError("ViTConfig: global_pool='map' normalises before pooling; fc_norm must be None or False")

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

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS, distillation, registers."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def pos_prefix_tokens(self) -> int:
        """Leading positions of pos_embed that are not on the patch grid (0 with no_embed_class)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def mlp_matmuls(self) -> int:
        """d x mlp_dim matmuls of a block's MLP: fc1 and fc2, or the gated MLP's gate, value and fc2."""
        return 2 if self.mlp == "mlp" else 3

    @property
    def head_features(self) -> int:
        return 2 * self.width if self.global_pool == "token_avg" else self.width

    def options(self) -> dict[str, object]:
        """The architecture options (not the sizes or training settings) that differ from a plain ViT's: what a
        weights layout must be able to hold, e.g. {"distilled": True, "init_values": 1e-6}. A layout refuses every
        option it does not know, so a new field is never dropped silently by an older layout."""
        plain = ViTConfig()
        sizes = {"patch_size", "width", "depth", "num_heads", "mlp_dim"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in RUN_FIELDS | sizes and getattr(self, f.name) != getattr(plain, f.name)}  # fmt: skip

    def param_count(self) -> int:
        """Trainable parameters, from the config alone (tests check it against the built model)."""
        d, m, c = self.width, self.mlp_dim, self.num_classes
        embed = self.patch_size**2 * self.in_chans * d + (d if self.patch_bias else 0)
        embed += self.num_prefix_tokens * d + (self.num_patches + self.pos_prefix_tokens) * d + (2 * d if self.pre_norm else 0)
        qkv_bias = (3 * d if self.key_bias else 2 * d) if self.qkv_bias else 0
        per_block = 4 * d + 3 * d * d + qkv_bias + d * d + d + self.mlp_matmuls * d * m + m * (1 if self.mlp == "mlp" else 2) + d
        per_block += (2 * d if self.init_values is not None else 0) + (4 * (d // self.num_heads) if self.qk_norm else 0)
        per_block += (2 * d if self.scale_attn_inner else 0) + (2 * m if self.scale_mlp else 0)
        head = 2 * d + self.head_features * c + c + (d * c + c if self.distilled else 0)
        if self.global_pool == "map":
            head += d + 4 * d * d + (3 * d if self.qkv_bias else 0) + d + 2 * d + 2 * d * m + m + d
        return embed + self.depth * per_block + head

    def forward_flops(self) -> int:
        """2 x multiply-adds of the patch projection, all attention and MLP matmuls, and the head."""
        tokens, d, m = self.num_tokens, self.width, self.mlp_dim
        patch = self.num_patches * self.patch_size**2 * self.in_chans * d
        per_block = tokens * (3 * d * d + d * d + self.mlp_matmuls * d * m) + 2 * tokens * tokens * d
        head = self.head_features * self.num_classes * (2 if self.distilled else 1)
        if self.global_pool == "map":  # keys and values of every token, one query
            head += tokens * 2 * d * d + 2 * tokens * d + 2 * d * d + 2 * d * m
        return 2 * (patch + self.depth * per_block + head)

    # ---- capabilities (flaxvision.models.base.ModelConfig) ----

    def num_layers(self) -> int:
        return self.depth

    def layer_index(self, path: str) -> int:
        """BEiT's layer ids: embeddings 0, block i -> i + 1, the final norm and the head depth + 1."""
        top, _, rest = path.partition(".")
        if top in ("patch_embed", "cls_token", "dist_token", "reg_token", "pos_embed", "norm_pre"):
            return 0
        if top == "blocks":
            return int(rest.split(".", 1)[0]) + 1
        return self.depth + 1

    def position_grid(self) -> int | None:
        return self.grid_size

    def position_prefix(self) -> int:
        return self.pos_prefix_tokens

    def train_memory_bytes(self, batch_size: int, *, optimizer_slots: int = 2) -> int:
        """Device memory of one training step, estimated: within ~2x of XLA's (tests check it).

        Activations the backward pass keeps, per token and block: "dots" keeps the matmul outputs (qkv, the
        attention scores, the attention output, proj, fc1 (gate and value for a gated MLP), fc2), the rotated
        q and k with rope, the sub-LN outputs and the block input, "none" about twice that
        (layer norms, softmax, GELU), "full" the block input only; plus one block's worth for the backward pass
        itself. XLA's attention materialises the (heads, T, T) scores, which dominate at many tokens (ViT-Ti
        with 3,137 tokens needs tens of GB at batch 32); a fused (flash) kernel needs less than estimated.
        """
        tokens, d, m = self.num_tokens, self.width, self.mlp_dim
        scores = self.num_heads * tokens
        gated = self.mlp_matmuls - 2  # the gate's output and the product, kept besides fc1's
        extra = (2 * d if self.rope else 0) + (d if self.scale_attn_inner else 0) + (m if self.scale_mlp else 0)
        everything = 11 * d + (3 + 2 * gated) * m + 3 * scores + 2 * extra
        per_block = {"none": everything, "dots": 7 * d + (1 + gated) * m + scores + extra, "full": d}[self.remat]
        itemsize = jnp.dtype(compute_dtype(self.dtype)).itemsize
        activations = batch_size * tokens * (self.depth * per_block + everything) * itemsize
        inputs = batch_size * self.img_size**2 * self.in_chans * 4
        return train_step_bytes(self.param_count(), optimizer_slots, activations + inputs)
