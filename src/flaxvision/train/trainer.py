"""The Trainer: the mesh, the sharded train state and the compiled steps of one run (no files, no loop).

    trainer = Trainer(config, model, steps_per_epoch=len(loader), jitter=augment)
    trainer.state = trainer.train_step(trainer.state, trainer.stage.put(batch))
    metrics = trainer.read_train_metrics()           # the only host sync, every log_every steps
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import jax

from flaxvision import distributed, host_memory
from flaxvision.data.device import DeviceStage
from flaxvision.errors import FlaxvisionError
from flaxvision.models.base import Classifier
from flaxvision.train import ema
from flaxvision.train.config import TrainConfig
from flaxvision.train.evaluation import run_evaluation
from flaxvision.train.mixup import MixConfig
from flaxvision.train.optim import make_optimizer, trainable_filter
from flaxvision.train.step import (
    TrainState,
    empty_metrics,
    make_eval_step,
    make_multi_step,
    make_train_step,
    merge_model,
    split_model,
)


class Trainer:
    """Holds the compiled steps and the sharded state of one run. `fit()` is the usual entry point."""

    def __init__(
        self,
        config: TrainConfig,
        model: Any,
        *,
        steps_per_epoch: int,
        preprocess: Callable[..., jax.Array] | None = None,
        jitter: Any = None,
        geometry: Any = None,
        devices: list | None = None,
    ):
        host_memory.trim_after_compiles()
        self.config = config
        self.model = model
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * config.epochs
        # ---- mesh and device stage: one data axis over every device of every process ---------------------------
        self.stage = DeviceStage(model.preprocessing, devices=devices, jitter=jitter, dtype=model.config.dtype,
                                 preprocess=preprocess, geometry=geometry)  # fmt: skip
        self.mesh = self.stage.mesh
        n = self.stage.device_count
        for field, size in (("batch_size", config.batch_size), ("eval_batch_size", config.global_eval_batch_size)):
            if size % n:
                flag = "--" + field.replace("_", "-")
                raise FlaxvisionError(f"{field} {size} does not divide by the {n} devices; use a multiple of {n} "
                                      f"such as {flag} {max(n, size // n * n)}")  # fmt: skip
        if (config.batch_size // n) % config.accumulate_steps and n > 1:
            raise FlaxvisionError(
                f"accumulate_steps {config.accumulate_steps} must divide the per-device batch {config.batch_size // n}"
            )
        self.replicated = self.stage.replicated

        # ---- model & optimizer ----------------------------------------------------------------------------------
        self.parts, state = split_model(model, trainable_filter(config, model.config))
        if not jax.tree.leaves(state.params):
            raise FlaxvisionError("nothing to train: --train-only/--freeze froze every parameter")
        self.tx, self.schedule = make_optimizer(config, state.params, model.config, self.total_steps)
        # An abstract model (`nnx.eval_shape`) gives an abstract state: shapes, dtypes and shardings, nothing
        # allocated, enough to lower, compile or export the steps (tests export ViT-B/16's step for GPU and TPU).
        abstract = any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(state.params))
        build = jax.eval_shape if abstract else (lambda f, *args: f(*args))
        state = state.replace(opt_state=build(self.tx.init, state.params))
        self.has_ema = config.ema_decay is not None
        if self.has_ema:
            state = state.replace(ema=build(ema.init, state.params, state.model_state))
        # Replicated, or FSDP: big arrays (parameters and the optimizer state shaped like them) split over "data".
        self.state_sharding = distributed.state_shardings(state, self.mesh, config.param_sharding, config.fsdp_min_size)
        if abstract:
            self.state: TrainState = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                                  state, self.state_sharding)  # fmt: skip
        else:
            self.state = jax.device_put(state, self.state_sharding)
        host_memory.release_free_memory()  # what building the model and optimizer state left in the heap

        # ---- steps ----------------------------------------------------------------------------------------------
        train_step = make_train_step(
            self.parts, self.tx, preprocess=self.stage.train_inputs, seed=config.seed,
            accumulate_steps=config.accumulate_steps, label_smoothing=config.label_smoothing,
            mix=MixConfig.from_train_config(config, steps_per_epoch, groups=n), num_classes=model.config.num_classes,
            ema_decay=config.ema_decay, ema_warmup=config.ema_warmup,
        )  # fmt: skip
        batch_sharding = self.stage.batch_sharding
        self.train_step = jax.jit(train_step, in_shardings=(self.state_sharding, batch_sharding),
                                  out_shardings=self.state_sharding, donate_argnums=0)  # fmt: skip
        # K steps per call for small models, where one dispatch (and the loop's bookkeeping) costs about a step.
        self.steps_per_dispatch = config.steps_per_dispatch or auto_steps_per_dispatch(model, config, n)
        self.train_steps = None
        if self.steps_per_dispatch > 1:
            self.train_steps = jax.jit(make_multi_step(train_step), donate_argnums=0,
                                       in_shardings=(self.state_sharding, self.stage.group_sharding),
                                       out_shardings=self.state_sharding)  # fmt: skip
        self.eval_step = jax.jit(
            make_eval_step(self.parts, preprocess=self.stage.eval_inputs, num_classes=model.config.num_classes),
            in_shardings=(self.state_sharding, batch_sharding),
            out_shardings=self.replicated,  # the sums, readable in every process
        )

    # ---- metrics ---------------------------------------------------------------------------------------------
    def read_train_metrics(self) -> dict[str, float]:
        """Fetch and reset the running sums (the only host sync of the training loop, every log_every steps)."""
        m = jax.device_get(self.state.metrics)
        self.state = self.state.replace(metrics=jax.device_put(empty_metrics(), self.replicated))
        count = int(m["count"])
        return {
            "loss": float(m["loss_sum"]) / count if count else float("nan"),
            "accuracy": int(m["correct"]) / count if count else float("nan"),
            "count": count,
            "first_bad_step": int(m["first_bad_step"]),
        }

    def weights_state(self, weights: str = "raw") -> TrainState:
        """The train state with the raw weights, or with their EMA in their place (`weights="ema"`)."""
        if weights == "ema":
            if not self.has_ema:
                raise FlaxvisionError("this run keeps no EMA of the weights; train with --ema-decay")
            return ema.weights(self.state)
        return self.state

    def evaluate(self, batches: Iterable, weights: str = "raw") -> dict[str, Any]:
        return run_evaluation(self.eval_step, self.weights_state(weights), batches, self.config.global_eval_batch_size,
                              self.stage)  # fmt: skip

    def current_model(self, weights: str = "raw") -> Any:
        """The model with the current (or EMA) weights, in eval mode (a fresh module; the trainer's state is untouched)."""
        # Sharded arrays (FSDP, several processes) are gathered first; every process must call this.
        source = self.weights_state(weights)
        parts = (source.params, source.frozen, source.model_state)
        if not all(leaf.is_fully_replicated for leaf in jax.tree.leaves(parts)):
            parts = jax.jit(lambda x: x, out_shardings=self.replicated)(parts)
        params, frozen, model_state = jax.device_get(parts)
        state = self.state.replace(params=params, frozen=frozen, model_state=model_state, opt_state=None, ema=None)
        model = cast(Classifier, merge_model(self.parts, state, train=False))
        model.preprocessing = self.model.preprocessing
        model.label_names = self.model.label_names
        return model


# On an accelerator, a step under this many FLOPs per device runs several steps per call: there a launch and the
# loop's Python cost a noticeable share of a small step. Not on the CPU: a step there takes milliseconds, the
# dispatch tens of microseconds, and grouping measured a loss (XLA:CPU runs conv backward passes ~16x slower in a
# loop body; BENCHMARKS.md).
SMALL_STEP_FLOPS = 50e9
MAX_AUTO_STEPS = 8


def auto_steps_per_dispatch(model: Any, config: TrainConfig, devices: int, platform: str | None = None) -> int:
    """K for --steps-per-dispatch left unset: 1 on the CPU and for a model whose step is large; else up to 8 steps
    per call, a divisor of log_every (so groups line up with the metric reads)."""
    platform = platform or jax.devices()[0].platform
    flops_fn = getattr(model.config, "forward_flops", None)
    if platform == "cpu" or flops_fn is None:
        return 1
    step_flops = 3 * flops_fn() * config.batch_size / devices  # forward + backward, per device
    if step_flops >= SMALL_STEP_FLOPS:
        return 1
    want = min(MAX_AUTO_STEPS, max(2, int(SMALL_STEP_FLOPS / max(step_flops, 1.0))))
    return max(k for k in range(1, want + 1) if config.log_every % k == 0)


def out_of_memory_error(err: BaseException, config: TrainConfig) -> FlaxvisionError | None:
    """A device out-of-memory error as a one-line message with options of `flaxvision train` to try, else None."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    smaller = max(config.batch_size // 2, 1)
    return FlaxvisionError(
        f"the device ran out of memory at batch size {config.batch_size}; try --batch-size {smaller}, or keep the "
        f"batch and add --accumulate-steps {2 * config.accumulate_steps} (or --dtype bfloat16 on a GPU/TPU)"
    )
