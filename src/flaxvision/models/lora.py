"""LoRA (Hu et al. 2021) for flaxvision ViTs: low-rank adapters on the encoder's linears, merged back for export.

    >>> model = flaxvision.create_model("vit_base_patch16_224", pretrained="google/vit-base-patch16-224", num_classes=101)
    >>> apply_lora(model, rank=16, alpha=16, targets="q,v")   # in place, on every block; B = 0: logits unchanged
    >>> plain = merge_lora(model)                               # a new plain ViT: kernels absorb alpha/rank * A @ B

Targets (any of, in every encoder block, as PEFT's `target_modules` matches every layer):
    qkv        the whole fused qkv projection: one adapter, A (D, r), B (r, 3D)
    q, k, v    only those output columns of the fused kernel, one adapter each, A (D, r), B (r, D): the parameters
               of PEFT on transformers' separate query/key/value layers ("q,v": the PEFT image-classification guide)
    proj       the attention's output projection; fc1, fc2: the MLP
Output of an adapted layer: y = x W + b + alpha / rank * dropout(x) A B (one dropout mask per adapter, on its
input, as PEFT's lora_dropout), computed in the layer's dtype (bfloat16 with dtype="bfloat16"; parameters stay
float32). Initialisation as PEFT's default: A Kaiming-uniform, U(-1/sqrt(D), 1/sqrt(D)), B zeros, so that an
adapted model's logits equal its base's exactly until the first update.

Layout: an adapted layer (`LoRALinear`) is still an nnx.Linear that owns its base kernel and bias at their own
paths ("blocks.0.attn.qkv.kernel"), so weight export, --freeze regexes, layer-wise decay and FSDP see the same
names; its adapters are nnx.LoRA modules beside them whose parameters are nnx.LoRAParam (an nnx.Param):
    blocks.{i}.attn.qkv.lora.lora_a (D, r), .lora.lora_b (r, 3D)        target qkv
    blocks.{i}.attn.qkv.lora_q.lora_a (D, r), .lora_q.lora_b (r, D)     targets q / k / v (lora_k, lora_v)
    blocks.{i}.attn.proj.lora.*, blocks.{i}.mlp.fc1.lora.*, blocks.{i}.mlp.fc2.lora.*
Every LoRA parameter has a path component starting with "lora" (`is_lora_path`); an adapter file holds those and
the head (`adapter_state`), which is what LoRA training trains.

Why nnx.LoRA and not nnx.LoRALinear: LoRALinear creates a new kernel, where an adapter wraps the pretrained one;
nnx.LoRA(base_module=linear) would move the kernel to ".base_module.kernel"; and neither scales by alpha / rank,
has dropout, or adapts some output columns of a fused layer. `LoRALinear` here adds those around nnx.LoRA.

Only ViTs (their attention and MLP linears) are adaptable; another family is one FlaxvisionError naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxvision.errors import ConfigError, FlaxvisionError
from flaxvision.models.base import param_path
from flaxvision.models.registry import name_of
from flaxvision.models.vit import ViT

TARGETS = ("qkv", "q", "k", "v", "proj", "fc1", "fc2")
QKV_PARTS = ("q", "k", "v")  # column blocks of the fused qkv kernel, in order
# (sub-module of a block, linear) of each target
LAYERS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}
# PEFT's default initialisation of lora_A: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
A_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """What adapters a model carries: rank, alpha (scale alpha / rank), targets (canonical order), dropout."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be an integer >= 1, e.g. 16; got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be > 0 (the scale is alpha / rank); got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1); got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def describe(self) -> str:
        return f"rank {self.rank}, alpha {self.alpha:g}, targets {','.join(self.targets)}, dropout {self.dropout:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "dropout": self.dropout}


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """"q, v" or ["q", "v"] -> ("q", "v") in canonical order; unknown names and qkv with q/k/v are errors."""
    items = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
    unknown = [t for t in items if t not in TARGETS]
    if unknown or not items:
        raise ConfigError(f"LoRA target {unknown[0] if unknown else ''!r} is not one of {', '.join(TARGETS)}")
    if "qkv" in items and any(t in items for t in QKV_PARTS):
        raise ConfigError("LoRA targets: qkv already covers q, k and v; list either qkv or some of q, k, v")
    return tuple(t for t in TARGETS if t in items)


def is_lora_path(path: Sequence[Any]) -> bool:
    """Whether a parameter path (nnx path or dotted name) is a LoRA parameter."""
    parts = path.split(".") if isinstance(path, str) else path
    return any(str(p).startswith("lora") for p in parts)


def is_adapter_path(path: Sequence[Any]) -> bool:
    """LoRA parameters and the head: what LoRA training trains and an adapter file holds."""
    parts = path.split(".") if isinstance(path, str) else path
    return is_lora_path(parts) or str(parts[0]) == "head"


class LoRALinear(nnx.Linear):
    """An nnx.Linear (the very kernel and bias of `base`) plus LoRA adapters on all or some of its output columns.

    `parts` None adapts the whole output (one adapter `lora`); a tuple of "q", "k", "v" adapts those thirds of a
    fused qkv projection (adapters `lora_q`, `lora_k`, `lora_v`).
    """

    def __init__(self, base: nnx.Linear, *, spec: LoRASpec, parts: tuple[str, ...] | None, deterministic: bool,
                 rngs: nnx.Rngs):  # fmt: skip
        # Adopt the base layer's variables and settings instead of calling Linear.__init__ (which would draw a new
        # kernel): the forward pass of the base part is then nnx.Linear's own, to the bit.
        for name, value in vars(base).items():
            if not name.startswith("_"):
                setattr(self, name, nnx.data(None) if name == "bias" and value is None else value)
        self.lora_rank, self.lora_alpha, self.lora_parts = spec.rank, spec.alpha, parts
        self.lora_dropout = nnx.Dropout(spec.dropout, deterministic=deterministic,
                                        rngs=rngs if spec.dropout > 0 else None)  # fmt: skip
        width = base.out_features // len(QKV_PARTS) if parts else base.out_features
        for name in self.adapter_names:
            setattr(self, name, nnx.LoRA(base.in_features, spec.rank, width, dtype=base.dtype, a_initializer=A_INIT,
                                         rngs=rngs))  # fmt: skip

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return ("lora",) if self.lora_parts is None else tuple(f"lora_{p}" for p in self.lora_parts)

    def adapter(self, name: str) -> nnx.LoRA:
        return getattr(self, name)

    def _pieces(self, compute: Any) -> jax.Array:
        """The LoRA term over all output columns: `compute(adapter)` per adapter, zeros for unadapted parts."""
        if self.lora_parts is None:
            return compute(self.adapter("lora"))
        pieces = [compute(self.adapter(f"lora_{p}")) if p in self.lora_parts else None for p in QKV_PARTS]
        like = next(p for p in pieces if p is not None)
        return jnp.concatenate([jnp.zeros_like(like) if p is None else p for p in pieces], axis=-1)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        y = super().__call__(inputs, out_sharding=out_sharding)
        scaling = self.lora_alpha / self.lora_rank
        return y + self._pieces(lambda adapter: adapter(self.lora_dropout(inputs)) * scaling).astype(y.dtype)

    def delta(self) -> jax.Array:
        """alpha / rank * A @ B over the whole kernel, in float32 at full precision (what merging adds)."""
        scaling = self.lora_alpha / self.lora_rank
        product = lambda adapter: scaling * jnp.matmul(  # noqa: E731
            jnp.asarray(adapter.lora_a[...], jnp.float32), jnp.asarray(adapter.lora_b[...], jnp.float32),
            precision=jax.lax.Precision.HIGHEST)  # fmt: skip
        return self._pieces(product)

    def merged(self) -> nnx.Linear:
        """A plain nnx.Linear whose kernel is W + alpha / rank * A @ B (the same settings and bias)."""
        settings: dict[str, Any] = dict(
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            dot_general=self.dot_general, promote_dtype=self.promote_dtype, preferred_element_type=self.preferred_element_type,
        )  # fmt: skip
        plain = nnx.eval_shape(lambda: nnx.Linear(self.in_features, self.out_features, rngs=nnx.Rngs(0), **settings))
        kernel = self.kernel[...]
        plain.kernel = nnx.Param((jnp.asarray(kernel, jnp.float32) + self.delta()).astype(kernel.dtype))
        if self.bias is not None:
            plain.bias = nnx.Param(self.bias[...])
        return plain


# ---- the model ---------------------------------------------------------------------------------------------------


def check_adaptable(model: Any) -> None:
    """Raise one FlaxvisionError unless `model` is a ViT (the only family LoRA adapts)."""
    if not isinstance(model, ViT):
        family = getattr(model, "family", "") or type(model).__name__
        config = getattr(model, "config", None)
        name = name_of(config) if dataclasses.is_dataclass(config) else type(model).__name__
        raise FlaxvisionError(f"LoRA adapts ViT-family models (their attention and MLP linears); {name} is a "
                              f"{family} model: train it without --lora-rank (e.g. with --train-only or --freeze)")  # fmt: skip


def _slots(model: ViT) -> Iterator[tuple[Any, str, str]]:
    """(parent module, attribute, target layer) of every adaptable linear, block by block."""
    for block in model.blocks:
        for layer, (sub, attr) in LAYERS.items():
            yield getattr(block, sub), attr, layer


def lora_spec(model: Any) -> LoRASpec | None:
    """The adapters `model` carries (None: none, or not a ViT)."""
    if not isinstance(model, ViT):
        return None
    targets: list[str] = []
    found: LoRALinear | None = None
    block = model.blocks[0]  # apply_lora adapts every block alike
    for layer, (sub, attr) in LAYERS.items():
        linear = getattr(getattr(block, sub), attr)
        if isinstance(linear, LoRALinear):
            found = linear
            targets += [layer] if linear.lora_parts is None else list(linear.lora_parts)
    if found is None:
        return None
    return LoRASpec(found.lora_rank, found.lora_alpha, parse_targets(targets), float(found.lora_dropout.rate))


def apply_lora(model: Any, *, rank: int, alpha: float | None = None, targets: str | Sequence[str] = "qkv",
               dropout: float = 0.0, seed: int = 0) -> Any:  # fmt: skip
    """Add LoRA adapters to every encoder block of a ViT, in place; returns the model.

    Args:
      rank: the adapters' rank r; alpha: their scale is alpha / r (None: alpha = r, a scale of 1).
      targets: a comma list or sequence of qkv, q, k, v, proj, fc1, fc2 (see the module docstring).
      dropout: dropout on each adapter's input while training.
      seed: seeds the A matrices (and the adapters' dropout stream).
    The base weights are kept as they are; B starts at zero, so the logits do not change until trained.
    """
    check_adaptable(model)
    existing = lora_spec(model)
    if existing is not None:
        raise FlaxvisionError(f"the model already carries LoRA adapters ({existing.describe()}); "
                              "merge_lora(model) first to add new ones on top")  # fmt: skip
    spec = LoRASpec(rank, float(rank if alpha is None else alpha), parse_targets(targets), float(dropout))
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    deterministic = bool(model.blocks[0].drop_path1.deterministic)  # new dropout layers follow the model's mode
    parts = tuple(p for p in QKV_PARTS if p in spec.targets) or None
    absent = sorted({layer for parent, attr, layer in _slots(model) if layer in spec.targets and getattr(parent, attr) is None})
    if absent:  # e.g. a SwiGLU MLP (EVA-02) has fc1_g / fc1_x, not fc1
        raise FlaxvisionError(f"LoRA target(s) {', '.join(absent)}: this model has no such layer (mlp={model.config.mlp!r}); "
                              "choose among qkv, q, k, v, proj" + ("" if "fc2" in absent else ", fc2"))  # fmt: skip
    for parent, attr, layer in _slots(model):
        if layer in spec.targets or (layer == "qkv" and parts):
            adapted = LoRALinear(getattr(parent, attr), spec=spec, parts=parts if layer == "qkv" else None,
                                 deterministic=deterministic, rngs=rngs)  # fmt: skip
            setattr(parent, attr, adapted)
    return model


def merge_lora(model: Any) -> Any:
    """A new plain model (the input is left as it is) whose kernels absorb alpha / rank * A @ B of its adapters.

    Its logits equal the adapted model's (to float32 rounding); it saves in every format of its family.
    """
    if lora_spec(model) is None:
        raise FlaxvisionError("merge_lora: the model carries no LoRA adapters (apply_lora or load_adapter adds them)")
    merged = nnx.clone(model)
    for parent, attr, _ in _slots(merged):
        linear = getattr(parent, attr)
        if isinstance(linear, LoRALinear):
            setattr(parent, attr, linear.merged())
    return merged


# ---- adapter state: what an adapter file holds ------------------------------------------------------------------


def _adapter_variables(model: Any) -> dict[str, nnx.Variable]:
    state = nnx.state(model, nnx.Param)
    return {param_path(path): var for path, var in nnx.to_flat_state(state) if is_adapter_path(path)}


def adapter_state(model: Any) -> dict[str, np.ndarray]:
    """Dotted path -> float32 array of every LoRA parameter and of the head (an adapter file's tensors)."""
    if lora_spec(model) is None:
        raise FlaxvisionError("the model carries no LoRA adapters: there is no adapter to save")
    return {name: np.asarray(var.get_value(), np.float32) for name, var in _adapter_variables(model).items()}


def load_adapter_state(model: Any, tensors: Mapping[str, np.ndarray], *, what: str = "the adapter") -> Any:
    """Set the LoRA parameters and head of an adapted model from `tensors`; every name and shape must match.

    Nothing is set unless all match (one error lists the problems): a partial load would pass silently.
    """
    variables = _adapter_variables(model)
    missing = sorted(set(variables) - set(tensors))
    unexpected = sorted(set(tensors) - set(variables))
    mismatched = [f"{k} {tuple(np.shape(tensors[k]))} vs {tuple(variables[k].shape)}" for k in sorted(set(variables) & set(tensors))
                  if tuple(np.shape(tensors[k])) != tuple(variables[k].shape)]  # fmt: skip
    problems = [f"{label} ({len(names)}): {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatches, adapter vs "
                                     "model", mismatched)) if names]  # fmt: skip
    if problems:
        raise FlaxvisionError(f"{what} does not fit this base model: {'; '.join(problems)}; nothing was loaded - "
                              "load it onto the base it was trained on")  # fmt: skip
    for name, var in variables.items():
        var.set_value(jnp.asarray(tensors[name], dtype=var.get_value().dtype))
    return model


def base_fingerprint(model: Any) -> str:
    """sha256 of the frozen base weights (every parameter but the LoRA ones and the head), float32, by name.

    An adapter records it, so that loading onto different weights of the same architecture can be noticed.
    """
    digest = hashlib.sha256()
    state = nnx.state(model, nnx.Param)
    for path, var in sorted(nnx.to_flat_state(state), key=lambda item: param_path(item[0])):
        if not is_adapter_path(path):
            digest.update(param_path(path).encode())
            digest.update(np.ascontiguousarray(np.asarray(var.get_value(), np.float32)).tobytes())
    return digest.hexdigest()
