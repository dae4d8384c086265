"""The jitted train and eval steps, as pure functions of a TrainState.

The model is split once into a static graph definition and arrays (trainable params, frozen params, other model
state such as BatchNorm statistics, RNG streams). The steps merge them back inside `jax.jit`, so the NNX graph is
walked only while tracing, never per step, and the whole state can be donated, sharded and checkpointed as one
pytree.

Dropout / drop-path keys are derived from (seed, step) each step, so a resumed run draws the same masks as one
that never stopped without any RNG state in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxvision.train import ema as ema_lib
from flaxvision.train.mixup import MixConfig, mix_batch

METRIC_KEYS = ("loss_sum", "correct", "count", "first_bad_step")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # trainable parameters (nnx.State)
    frozen: Any  # parameters that are not trained (nnx.State, possibly empty)
    model_state: Any  # BatchNorm statistics and any other non-parameter state (nnx.State)
    opt_state: Any
    metrics: dict[str, jax.Array]  # running sums since metrics were last read
    ema: Any = None  # {"params", "model_state"}: the EMA of the weights (train.ema), or None without EMA

    if TYPE_CHECKING:  # flax.struct.dataclass adds `replace` at runtime; declared here for the type checker only

        def replace(self, **changes: Any) -> TrainState: ...


def empty_metrics() -> dict[str, jax.Array]:
    return {
        "loss_sum": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
        "first_bad_step": jnp.full((), -1, jnp.int32),  # first step whose loss or gradients were not finite
    }


@dataclass(frozen=True)
class ModelParts:
    """Static pieces to rebuild the model inside jit: graph definitions for both modes and the RNG streams."""

    train_graph: Any
    eval_graph: Any
    rngs: Any  # nnx.State of RngState, reseeded every step


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter) -> tuple[ModelParts, TrainState]:
    """Split `model` into static parts and a TrainState (no optimizer state yet)."""
    model.eval()
    eval_graph, *_ = nnx.split(model, trainable, nnx.Param, nnx.RngState, ...)
    model.train()
    train_graph, params, frozen, rngs, rest = nnx.split(model, trainable, nnx.Param, nnx.RngState, ...)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, model_state=rest, opt_state=None,
        metrics=empty_metrics(),
    )  # fmt: skip
    return ModelParts(train_graph, eval_graph, rngs), state


def merge_model(parts: ModelParts, state: TrainState, *, train: bool) -> nnx.Module:
    graph = parts.train_graph if train else parts.eval_graph
    fresh = jax.tree.map(lambda x: x, (state.params, state.frozen, parts.rngs, state.model_state))
    return nnx.merge(graph, *fresh)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing."""
    logits = logits.astype(jnp.float32)
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy against soft targets (mixup/CutMix), in float32."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _tree_select(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def make_train_step(
    parts: ModelParts,
    tx: optax.GradientTransformation,
    *,
    preprocess: Callable[[jax.Array, jax.Array], jax.Array],
    seed: int,
    accumulate_steps: int = 1,
    label_smoothing: float = 0.0,
    mix: MixConfig | None = None,
    num_classes: int | None = None,
    ema_decay: float | None = None,
    ema_warmup: bool = False,
) -> Callable[[TrainState, dict[str, jax.Array]], TrainState]:
    """Build `train_step(state, batch) -> state` (to be jitted with the state donated).

    `preprocess(images, key)` turns a batch of raw images into model inputs on the device (normalisation and any
    device-side augmentation). With `accumulate_steps` k > 1 the batch is split into k micro-batches whose
    gradients are averaged: the same update as the whole batch at a k-th of the activation memory.
    `mix` mixes the batch (mixup/CutMix, train.mixup) and trains on soft targets; train accuracy then counts the
    label with the larger share. `ema_decay` keeps `state.ema` (train.ema) as the average of the weights.
    A step whose loss or gradients are not finite leaves the state untouched and is recorded in the metrics.
    """
    base_key = jax.random.key(seed)
    if mix is not None and num_classes is None:
        raise ValueError("mixing needs num_classes")

    def loss_fn(params, state, images, targets, key):
        # Fresh Variable objects at this trace level (a captured State's Variables cannot be mutated in here).
        fresh = jax.tree.map(lambda x: x, (state.frozen, parts.rngs, state.model_state))
        model = nnx.merge(parts.train_graph, params, *fresh)
        nnx.reseed(model, dropout=key)
        logits = model(images)
        if targets.ndim == 2:  # soft targets
            losses, labels = soft_cross_entropy(logits, targets), jnp.argmax(targets, axis=-1)
        else:
            losses, labels = cross_entropy(logits, targets, label_smoothing), targets
        new_model_state = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
        return losses.mean(), (new_model_state, losses.sum(), correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> TrainState:
        step_key = jax.random.fold_in(base_key, state.step)
        augment_key, dropout_key = jax.random.split(step_key)
        images = preprocess(batch["image"], augment_key)
        labels = batch["label"].astype(jnp.int32)
        if mix is not None:  # (a third stream: the others stay as they are without mixing)
            images, labels = mix_batch(images, labels, jax.random.fold_in(step_key, 2), mix, num_classes, state.step)  # type: ignore[arg-type]

        if accumulate_steps == 1:
            (_, (model_state, loss_sum, correct)), grads = grad_fn(state.params, state, images, labels, dropout_key)
        else:
            micro = lambda x: x.reshape(accumulate_steps, x.shape[0] // accumulate_steps, *x.shape[1:])  # noqa: E731

            def one(carry, inputs):
                grads_acc, model_state, loss_acc, correct_acc, i = carry
                x, y = inputs
                (_, (model_state, loss_sum, correct)), grads = grad_fn(
                    state.params, state.replace(model_state=model_state), x, y, jax.random.fold_in(dropout_key, i)
                )
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                return (grads_acc, model_state, loss_acc + loss_sum, correct_acc + correct, i + 1), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, state.model_state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), 0)
            (grads, model_state, loss_sum, correct, _), _ = jax.lax.scan(one, init, (micro(images), micro(labels)))
            grads = jax.tree.map(lambda g: g / accumulate_steps, grads)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # A step is good when its loss, gradients and updates are all finite (then so are the new parameters); a
        # bad one changes nothing. Two global norms make one scalar, materialised by the barrier: left to fusion,
        # XLA copies the whole check into each of the hundreds of per-parameter selects below, which multiplied
        # the compiled program's size (and ViT-B/16's compile time) several times over. A norm that overflows
        # float32 counts as non-finite: such a step has diverged anyway.
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(optax.tree.norm(grads)) & jnp.isfinite(optax.tree.norm(updates))
        finite = jax.lax.optimization_barrier(finite)
        m = state.metrics
        metrics = {
            "loss_sum": m["loss_sum"] + jnp.where(finite, loss_sum, 0.0),
            "correct": m["correct"] + jnp.where(finite, correct, 0).astype(jnp.int32),
            "count": m["count"] + jnp.where(finite, labels.shape[0], 0).astype(jnp.int32),
            "first_bad_step": jnp.where((m["first_bad_step"] < 0) & ~finite, state.step, m["first_bad_step"]),
        }
        new_ema = state.ema
        if ema_decay is not None:
            decay = ema_lib.decay_at(state.step + 1, ema_decay, ema_warmup)
            new_ema = _tree_select(finite, ema_lib.update(state.ema, params, model_state, decay), state.ema)
        return state.replace(
            step=state.step + 1,
            params=_tree_select(finite, params, state.params),
            opt_state=_tree_select(finite, opt_state, state.opt_state),
            model_state=_tree_select(finite, model_state, state.model_state),
            metrics=metrics,
            ema=new_ema,
        )

    return train_step


def make_multi_step(train_step: Callable[[TrainState, dict[str, jax.Array]], TrainState]) -> Callable[..., TrainState]:
    """`multi_step(state, batches) -> state`: train_step over K stacked batches (K, B, ...) in one call (lax.scan).

    Each step is the same function of (state, batch) as alone (its keys come from state.step), and the scan's body
    is compiled as one step alone is, so K steps here give the state of K calls of train_step, bit for bit (an
    unrolled scan lets XLA fuse across steps and changes the last bits). Groups cut short run as single steps.
    On XLA:CPU a convolution's backward pass runs ~20x slower inside a loop body than at the top level (the MNIST
    CNN, BENCHMARKS.md), which is one reason the automatic choice is one step per call on the CPU.
    """

    def multi_step(state: TrainState, batches: dict[str, jax.Array]) -> TrainState:
        state, _ = jax.lax.scan(lambda s, batch: (train_step(s, batch), None), state, batches)
        return state

    return multi_step


def make_eval_step(
    parts: ModelParts, *, preprocess: Callable[[jax.Array], jax.Array], num_classes: int
) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
    """Build `eval_step(state, batch) -> sums` over the valid examples of a (possibly padded) batch.

    Returns loss_sum, correct (top-1), correct5 (top-5), count, and a confusion matrix (true x predicted).
    Batches may carry a boolean "mask"; padded examples count nowhere.
    """

    def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        model = merge_model(parts, state, train=False)
        logits = model(preprocess(batch["image"]))
        labels = batch["label"].astype(jnp.int32)
        mask = batch["mask"].astype(bool) if "mask" in batch else jnp.ones(labels.shape, bool)
        losses = cross_entropy(logits, labels)
        top1 = jnp.argmax(logits, axis=-1)
        k = min(5, num_classes)
        top5 = jax.lax.top_k(logits, k)[1]
        in_top5 = jnp.any(top5 == labels[:, None], axis=-1)
        confusion = jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, top1].add(mask.astype(jnp.int32))
        return {
            "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
            "correct": jnp.sum(mask & (top1 == labels)).astype(jnp.int32),
            "correct5": jnp.sum(mask & in_top5).astype(jnp.int32),
            "count": jnp.sum(mask).astype(jnp.int32),
            "confusion": confusion,
        }

    return eval_step
