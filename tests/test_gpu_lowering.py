"""The real train step lowers for CUDA and TPU: nothing CPU-only (host callbacks, CPU custom calls, float64) in it.

The machine that runs the tests has no accelerator, so the step is exported (`jax.export`, cross-platform
lowering; nothing compiles or runs) for each platform: ViT-B/16 and ResNet-18 at 224 px, float32 and bfloat16,
with the parts of a real recipe that add work inside the step (AdamW with weight decay, clipping, label smoothing,
mixup/CutMix, colour jitter, EMA). The Trainer is built on an abstract model (`nnx.eval_shape`), so no weight is
allocated: the whole file takes a few seconds.
"""

from __future__ import annotations

import collections
import functools
import re

import jax
import numpy as np
import pytest
from flax import nnx

import flaxvision
from flaxvision.data.transforms import AugmentConfig
from flaxvision.train import TrainConfig, Trainer

BATCH = 2
CASES = [(model, dtype) for model in ("vit_base_patch16_224", "resnet18") for dtype in ("float32", "bfloat16")]
PLATFORMS = ("cuda", "tpu")

# Custom calls a step may contain on each platform. jax.export already refuses targets outside its own list of
# stable ones (host callbacks among them); this list is ours and stricter: sharding annotations everywhere, cuDNN
# and cuBLAS kernels on CUDA only (e.g. fused attention, if the model asks for it). Found today: none at all.
ALLOWED_EVERYWHERE = ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape")
ALLOWED_PREFIXES = {"cuda": ("__cudnn$", "__cublas$", "cu_threefry2x32"), "tpu": ()}

_CUSTOM_CALL = re.compile(r"custom_call @([\w$.]+)|call_target_name = \"([^\"]+)\"")
# `stablehlo.dot_general ... : (tensor<AxBxbf16>, tensor<CxDxbf16>) -> ...` and the same for convolution.
_OPERANDS = re.compile(r"stablehlo\.(dot_general|convolution)(.*): \(tensor<([^>]*)>, tensor<([^>]*)>\) ->")
# A dot's `algorithm = <lhs_precision_type = bf16, rhs_precision_type = bf16, ...>`: the types it multiplies in,
# whatever its operands' (jax's attention differentiates its float32-accumulated scores this way).
_ALGORITHM = re.compile(r"lhs_precision_type = (\w+), rhs_precision_type = (\w+)")


@functools.cache
def _trainer(model: str, dtype: str) -> Trainer:
    net = nnx.eval_shape(lambda: flaxvision.create_model(model, img_size=224, dtype=dtype))
    config = TrainConfig(
        model=model, dtype=dtype, batch_size=BATCH, eval_batch_size=BATCH, optimizer="adamw", weight_decay=0.05,
        clip_grad_norm=1.0, label_smoothing=0.1, mixup=0.8, cutmix=1.0, ema_decay=0.999, schedule="cosine",
        warmup_steps=2,
    )  # fmt: skip
    jitter = AugmentConfig(brightness=0.2, contrast=0.2, saturation=0.2)
    return Trainer(config, net, steps_per_epoch=10, jitter=jitter, devices=jax.devices()[:1])


@functools.cache
def _exported(model: str, dtype: str, platform: str) -> jax.export.Exported:
    """Trainer.train_step exported for `platform`, its pytrees flattened so that the result serializes (Exported
    serializes only tree nodes registered with jax.export, which flax's State and Variables are not)."""
    trainer = _trainer(model, dtype)
    treedef = jax.tree.structure(trainer.state)

    def flat_step(leaves, batch):
        return jax.tree.leaves(trainer.train_step(jax.tree.unflatten(treedef, leaves), batch))

    sharding = trainer.stage.batch_sharding
    batch = {
        "image": jax.ShapeDtypeStruct((BATCH, 224, 224, 3), np.uint8, sharding=sharding),
        "label": jax.ShapeDtypeStruct((BATCH,), np.int32, sharding=sharding),
    }
    leaves = jax.tree.leaves(trainer.state)
    return jax.export.export(jax.jit(flat_step, donate_argnums=0), platforms=(platform,))(leaves, batch)


def _custom_call_targets(text: str) -> set[str]:
    return {a or b for a, b in _CUSTOM_CALL.findall(text)}


def _element_type(tensor: str) -> str:
    return tensor.rsplit("x", 1)[-1]  # "2x197x768xbf16" -> "bf16"


def _elements(tensor: str) -> int:
    return int(np.prod([int(d) for d in tensor.split("x")[:-1]]))


def _matmul_types(text: str) -> collections.Counter:
    """(op, lhs type, rhs type) that every dot_general and convolution whose two operands both have >= 64K
    elements multiplies in (the model's matmuls and convolutions, forward and backward; not the loss's or the
    norms' small products): its algorithm's precision types where it names them, else its operands' types."""
    found: collections.Counter = collections.Counter()
    for op, attributes, lhs, rhs in _OPERANDS.findall(text):
        if min(_elements(lhs), _elements(rhs)) >= 2**16:
            algorithm = _ALGORITHM.search(attributes)
            types = algorithm.groups() if algorithm else (_element_type(lhs), _element_type(rhs))
            found[(op, *types)] += 1
    return found


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(("model", "dtype"), CASES)
def test_train_step_lowers_without_cpu_only_operations(model, dtype, platform):
    exported = _exported(model, dtype, platform)
    assert exported.platforms == (platform,)
    assert exported.nr_devices == 1
    assert not exported.ordered_effects and not exported.unordered_effects  # host callbacks are effects

    text = exported.mlir_module()
    targets = _custom_call_targets(text)
    print(f"{model} {dtype} {platform}: custom calls {sorted(targets) or 'none'}")
    allowed = lambda t: t in ALLOWED_EVERYWHERE or t.startswith(ALLOWED_PREFIXES[platform])  # noqa: E731
    assert {t for t in targets if not allowed(t)} == set(), text[:2000]
    assert not re.search(r"[x<]f64>", text), "float64 in the step (x64 is off: a constant or cast that asks for it)"

    # The state is donated: every input of the state is aliased to an output (no second copy on the device).
    assert text.count("tf.aliasing_output") == len(exported.in_avals) - 2  # all but the batch's image and label

    # Serialized bytes come back as the same program for the same platform.
    again = jax.export.deserialize(exported.serialize())
    assert again.platforms == (platform,)
    signature = lambda e: [(a.shape, a.dtype) for a in (*e.in_avals, *e.out_avals)]  # noqa: E731
    assert signature(again) == signature(exported)
    assert again.mlir_module_serialized == exported.mlir_module_serialized


@pytest.mark.parametrize(("model", "dtype"), CASES)
def test_big_matmuls_run_in_the_compute_dtype(model, dtype):
    """bfloat16 models multiply in bfloat16 (their float32 master weights are cast), float32 ones in float32: every
    large dot_general / convolution, forward and backward, multiplies in the compute dtype."""
    found = _matmul_types(_exported(model, dtype, "cuda").mlir_module())
    want = "bf16" if dtype == "bfloat16" else "f32"
    print(f"{model} {dtype}: {dict(found)}")
    expected_op = "dot_general" if model.startswith("vit") else "convolution"
    # Found today: ViT-B/16 20 large dot_generals (patch embedding, the block that nnx.scan traces once for all 12,
    # head; forward and backward), ResNet-18 33 large convolutions.
    assert sum(n for (op, _, _), n in found.items() if op == expected_op) >= 15, found
    assert {(lhs, rhs) for _, lhs, rhs in found} == {(want, want)}, found
