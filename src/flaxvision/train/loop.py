"""The training loop: mesh, input, model & optimizer, sharding, steps, evaluation, checkpoints, run directory.

    summary = flaxvision.train.fit(TrainConfig(...), run_dir="runs/x")                      # data from config
    summary = flaxvision.train.fit(config, run_dir="runs/x", train_data=loader, val_data=val_loader)

`train_data` is anything re-iterable that yields one epoch of batches per `iter()`: a flaxvision.data loader, a
torch DataLoader with a NumPy collate, or a list of dicts. A batch is {"image": (B, H, W, C), "label": (B,)}
(or an (image, label) tuple); images are uint8 pixels (normalised on the device with the model's mean/std) or
already-normalised floats. Exact resume uses the iterator's get_state/set_state when it has them, and otherwise
re-creates the epoch and skips the batches already consumed (exact for any deterministic iterable).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from flaxvision import distributed, host_memory
from flaxvision.errors import FlaxvisionError, TrainingDiverged, TrainingInterrupted
from flaxvision.train import checkpoint as ckpt
from flaxvision.train.config import TrainConfig
from flaxvision.train.optim import make_optimizer, trainable_filter
from flaxvision.train.step import (
    TrainState,
    empty_metrics,
    make_eval_step,
    make_train_step,
    merge_model,
    normalize,
    split_model,
)


# ---- input ---------------------------------------------------------------------------------------------------


def _as_dict(batch: Any) -> dict[str, np.ndarray]:
    if isinstance(batch, dict):
        return {k: np.asarray(v) for k, v in batch.items() if k in ("image", "label", "mask")}
    image, label = batch[0], batch[1]
    return {"image": np.asarray(image), "label": np.asarray(label)}


class EpochCursor:
    """One epoch of a re-iterable data source, with a position that can be saved and restored."""

    def __init__(self, data: Iterable, epoch: int, state: Any = None, skip: int = 0):
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        self.iterator: Iterator = iter(data)
        self.consumed = 0
        if state is not None and hasattr(self.iterator, "set_state"):
            self.iterator.set_state(state)
            self.consumed = skip
        else:
            for _ in range(skip):
                next(self.iterator)
                self.consumed += 1

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], tuple[int, Any]]]:
        """Yield (batch, position after it); the position is taken before anything reads ahead (prefetch)."""
        stateful = hasattr(self.iterator, "get_state")
        for batch in self.iterator:
            self.consumed += 1
            yield _as_dict(batch), (self.consumed, _json_safe(self.iterator.get_state()) if stateful else None)


def _json_safe(state: Any) -> Any:
    if isinstance(state, bytes):
        return {"__bytes__": state.decode("latin-1")}
    return state


def _from_json_safe(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return state["__bytes__"].encode("latin-1")
    return state


# ---- the run -------------------------------------------------------------------------------------------------


class _DeferredInterrupt:
    """Ctrl-C while training stops at the next safe point (after a step's bookkeeping), so the checkpoint written
    then matches the data position exactly; a second Ctrl-C stops at once (the last checkpoint stands)."""

    def __init__(self, defer: bool = True):
        # Several processes: a Ctrl-C reaches them at different steps (or only one of them), and a checkpoint is
        # a collective, so the interrupted process stops at once and the last checkpoint stands.
        self.requested, self.forced = False, not defer
        self.previous = None
        if defer and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True

    def stop_here(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


class MetricsLog:
    """metrics.jsonl: one JSON record per logged step and per evaluation (process 0 only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop records a killed run wrote after its last checkpoint."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    checkpoints = run_dir / "checkpoints"
    if overwrite:
        if jax.process_index() == 0:
            ckpt.clear(checkpoints)
            for name in ("metrics.jsonl", "summary.json"):
                (run_dir / name).unlink(missing_ok=True)
    elif not resume and (ckpt.has_checkpoints(checkpoints) or (run_dir / "metrics.jsonl").exists()):
        raise FlaxvisionError(
            f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad an eval batch to `size` examples with a mask, so every batch has one shape (one compilation)."""
    n = len(batch["label"])
    mask = batch.get("mask", np.ones(n, bool)).astype(bool)
    if n == size:
        return {**batch, "mask": mask}
    if n > size:
        raise FlaxvisionError(f"an evaluation batch has {n} examples, more than eval_batch_size {size}")
    pad = lambda x: np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])  # noqa: E731
    return {"image": pad(batch["image"]), "label": pad(batch["label"]), "mask": pad(mask)}


def out_of_memory_error(err: Exception, config: TrainConfig) -> FlaxvisionError | None:
    """A device out-of-memory error as a one-line message with a batch size to try, else None."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    smaller = max(config.batch_size // 2, 1)
    return FlaxvisionError(
        f"the device ran out of memory at batch size {config.batch_size}; try --batch-size {smaller}, or keep the "
        f"batch and add --accumulate-steps {2 * config.accumulate_steps} (or --dtype bfloat16 on a GPU/TPU)"
    )


def prefetch_to_device(items: Iterable[tuple[dict, Any]], to_device: Callable, size: int = 2) -> Iterator[tuple[dict, Any]]:
    """Put the next batches on the devices while the current step runs (device_put is asynchronous).

    Items are (batch, tag) pairs; the tag (e.g. the data position after the batch) travels with its batch.
    """
    queue: list = []
    for batch, tag in items:
        queue.append((to_device(batch), tag))
        if len(queue) >= size:
            yield queue.pop(0)
    yield from queue


def run_evaluation(eval_step: Callable, state: Any, batches: Iterable, batch_size: int, prefetch: Callable) -> dict[str, Any]:
    """Sum `eval_step` over every (padded) batch on the device; read the totals once at the end.

    `batch_size` is the global batch: each process pads its own batches to its share of it. With several
    processes every one must yield the same number of batches (flaxvision loaders do: the last global batch is
    padded with masked rows), each covering its own examples, so the sums cover the data exactly once.
    """
    totals = None
    local_size = batch_size // jax.process_count()
    for batch, _ in prefetch((_pad_batch(_as_dict(b), local_size), None) for b in batches):
        sums = eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise FlaxvisionError("the validation data yielded no batches")
    t = jax.device_get(totals)
    count = int(t["count"])
    confusion = np.asarray(t["confusion"])
    support = confusion.sum(1)
    per_class = np.divide(np.diag(confusion), support, out=np.full(len(confusion), np.nan), where=support > 0)
    return {
        "val_loss": float(t["loss_sum"]) / count,
        "val_accuracy": int(t["correct"]) / count,
        "val_top5_accuracy": int(t["correct5"]) / count,
        "val_count": count,
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }


class Evaluator:
    """Evaluation alone (no optimizer): the eval step of a trained model, sharded over the local devices."""

    def __init__(self, model: Any, *, batch_size: int, preprocess: Callable | None = None, devices: list | None = None):
        host_memory.trim_after_compiles()
        devices = devices or jax.devices()
        if batch_size % len(devices):
            raise FlaxvisionError(f"batch size {batch_size} does not divide by the {len(devices)} devices")
        self.batch_size = batch_size
        mesh = Mesh(np.asarray(devices), ("data",))
        self.batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        parts, state = split_model(model, nnx.Param)
        self.state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        pre = model.preprocessing
        dtype = jnp.dtype(model.config.dtype)
        eval_pre = preprocess or (lambda images: normalize(images, pre.mean, pre.std, dtype))
        self.eval_step = jax.jit(make_eval_step(parts, preprocess=eval_pre, num_classes=model.config.num_classes))

    def prefetch(self, items: Iterable, size: int = 2) -> Iterator:
        return prefetch_to_device(items, self.to_device, size)

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

    def evaluate(self, batches: Iterable) -> dict[str, Any]:
        return run_evaluation(self.eval_step, self.state, batches, self.batch_size, self.prefetch)


class Trainer:
    """Holds the compiled steps and the sharded state of one run. `fit()` is the usual entry point."""

    def __init__(
        self,
        config: TrainConfig,
        model: Any,
        *,
        steps_per_epoch: int,
        preprocess: Callable[..., jax.Array] | None = None,
        devices: list | None = None,
    ):
        host_memory.trim_after_compiles()
        self.config = config
        self.model = model
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * config.epochs
        devices = devices or jax.devices()
        # ---- mesh: one data axis over every device of every process --------------------------------------------
        self.mesh = Mesh(np.asarray(devices), ("data",))
        n = len(devices)
        for field, size in (("batch_size", config.batch_size), ("eval_batch_size", config.global_eval_batch_size)):
            if size % n:
                raise FlaxvisionError(
                    f"{field} {size} does not divide by the {n} devices; use a multiple of {n} "
                    f"such as {max(n, size // n * n)}"
                )
        if (config.batch_size // n) % config.accumulate_steps and n > 1:
            raise FlaxvisionError(
                f"accumulate_steps {config.accumulate_steps} must divide the per-device batch {config.batch_size // n}"
            )
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))

        # ---- model & optimizer ----------------------------------------------------------------------------------
        self.parts, state = split_model(model, trainable_filter(config, model.config))
        if not jax.tree.leaves(state.params):
            raise FlaxvisionError("nothing to train: --train-only/--freeze froze every parameter")
        self.tx, self.schedule = make_optimizer(config, state.params, model.config, self.total_steps)
        state = state.replace(opt_state=self.tx.init(state.params))
        # Replicated, or FSDP: big arrays (parameters and the optimizer state shaped like them) split over "data".
        self.state_sharding = distributed.state_shardings(state, self.mesh, config.param_sharding, config.fsdp_min_size)
        self.state: TrainState = jax.device_put(state, self.state_sharding)
        host_memory.release_free_memory()  # what building the model and optimizer state left in the heap

        # ---- steps ----------------------------------------------------------------------------------------------
        pre = model.preprocessing
        dtype = jnp.dtype(model.config.dtype)
        default_train = lambda images, key: normalize(images, pre.mean, pre.std, dtype)  # noqa: E731
        train_pre = preprocess or default_train
        eval_pre = (lambda images: preprocess(images, None)) if preprocess else (lambda images: default_train(images, None))
        train_step = make_train_step(
            self.parts, self.tx, preprocess=train_pre, seed=config.seed,
            accumulate_steps=config.accumulate_steps, label_smoothing=config.label_smoothing,
        )  # fmt: skip
        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=self.state_sharding,
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            make_eval_step(self.parts, preprocess=eval_pre, num_classes=model.config.num_classes),
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=self.replicated,  # the sums, readable in every process
        )

    # ---- batches to devices ----------------------------------------------------------------------------------
    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

    def prefetch(self, items: Iterable[tuple[dict[str, np.ndarray], Any]], size: int = 2) -> Iterator[tuple[dict, Any]]:
        return prefetch_to_device(items, self.to_device, size)

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

    def evaluate(self, batches: Iterable) -> dict[str, Any]:
        return run_evaluation(self.eval_step, self.state, batches, self.config.global_eval_batch_size, self.prefetch)

    def current_model(self) -> Any:
        """The model with the current weights, in eval mode (a fresh module; the trainer's state is untouched)."""
        # Sharded arrays (FSDP, several processes) are gathered first; every process must call this.
        parts = (self.state.params, self.state.frozen, self.state.model_state)
        if not all(leaf.is_fully_replicated for leaf in jax.tree.leaves(parts)):
            parts = jax.jit(lambda x: x, out_shardings=self.replicated)(parts)
        params, frozen, model_state = jax.device_get(parts)
        state = self.state.replace(params=params, frozen=frozen, model_state=model_state, opt_state=None)
        model = merge_model(self.parts, state, train=False)
        model.preprocessing = self.model.preprocessing
        model.label_names = self.model.label_names
        return model


@dataclasses.dataclass
class FitResult:
    summary: dict[str, Any]  # the content of summary.json
    model: Any  # the final model (eval mode), with its label names
    run_dir: Path
    trainer: Trainer  # live state, compiled steps (e.g. for further evaluation)


def fit(
    config: TrainConfig,
    *,
    run_dir: str | os.PathLike,
    model: Any = None,
    train_data: Iterable | None = None,
    val_data: Iterable | None = None,
    class_names: list[str] | None = None,
    steps_per_epoch: int | None = None,
    preprocess: Callable[..., jax.Array] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end: Callable[[Trainer, dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train `config` (or `model` on `train_data`), write the run directory, return the summary and final model.

    Args:
      config: the recipe (see TrainConfig; presets are TrainConfigs).
      run_dir: where config.json, metrics.jsonl, summary.json, checkpoints/ and model/ go.
      model: a flaxvision model; None builds `config.model` (pretrained from `config.pretrained`).
      train_data / val_data: re-iterable batch sources (None: built from `config.dataset`).
      class_names: label names (taken from the data source when it has `class_names`).
      steps_per_epoch: batches per epoch when `len(train_data)` is not defined.
      preprocess: `(images, key_or_None) -> model inputs` on the device; default: normalise with the model's
        mean/std (key is None at evaluation).
      resume: continue from the latest checkpoint in run_dir; overwrite: discard what run_dir holds.
    """
    run_dir = Path(run_dir)
    is_main = jax.process_index() == 0
    processes = jax.process_count()
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_run_dir(run_dir, resume, overwrite)
    distributed.barrier("flaxvision:run-dir-checked")  # no process starts writing before all have looked

    if train_data is None:
        train_data, val_data, class_names, model, data_preprocess = data_from_config(config, model)
        preprocess = preprocess or data_preprocess
    class_names = class_names or getattr(train_data, "class_names", None)
    if steps_per_epoch is None:
        try:
            steps_per_epoch = len(train_data)
        except TypeError:
            raise FlaxvisionError("train_data has no len(); pass steps_per_epoch") from None
    if steps_per_epoch < 1:
        raise FlaxvisionError("the training data yields no full batch; lower --batch-size or add data")
    if model is None:
        model = _build_model(config, num_classes=len(class_names) if class_names else None)
    if class_names:
        check_class_count(model, len(class_names))
    if class_names and model.label_names is None:
        model.label_names = tuple(class_names)

    trainer = Trainer(config, model, steps_per_epoch=steps_per_epoch, preprocess=preprocess)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main)
    checkpointer = ckpt.Checkpointer(run_dir / "checkpoints", keep=config.keep_checkpoints)
    if is_main:
        (run_dir / "config.json").write_text(json.dumps(_run_record(config, trainer, class_names), indent=2))

    # ---- resume ------------------------------------------------------------------------------------------------
    meta = {"epoch": 0, "batch_in_epoch": 0, "data_state": None, "best_val_accuracy": None, "best_step": None,
            "wall_seconds": 0.0, "train_seconds": 0.0, "train_images": 0}  # fmt: skip
    latest = checkpointer.latest_step() if resume else None
    if resume and is_main:
        log.truncate_after(latest or 0)  # what a killed run logged after its last checkpoint is redone
    if latest is not None:
        trainer.state, meta = checkpointer.restore(latest, trainer.state)
        meta["data_state"] = _data_state_for_this_process(meta)
        if is_main:
            print(f"resumed from step {latest} (epoch {meta['epoch'] + 1}, batch {meta['batch_in_epoch']})"
                  + (f", saved by {meta['processes']} processes" if meta.get("processes", 1) != processes else ""))  # fmt: skip
    elif resume and is_main:
        print(f"no checkpoint in {checkpointer.directory} yet: starting from step 0")

    started = time.perf_counter() - meta["wall_seconds"]
    step = int(jax.device_get(trainer.state.step))
    last_eval: dict[str, Any] | None = None
    images_since_log, time_since_log = 0, time.perf_counter()

    def save(val_accuracy: float | None = None) -> None:
        # Every process calls this (Orbax writes the arrays cooperatively); the data-iterator state of every
        # process goes into the meta item, which process 0 writes.
        meta.update(wall_seconds=time.perf_counter() - started, processes=processes,
                    data_states=distributed.allgather_json(meta["data_state"]))  # fmt: skip
        checkpointer.save(step, trainer.state, dict(meta), val_accuracy=val_accuracy)

    def log_train(epoch: int) -> dict[str, float]:
        nonlocal images_since_log, time_since_log
        m = trainer.read_train_metrics()
        if m["first_bad_step"] >= 0:
            checkpointer.wait()
            good = checkpointer.latest_step()
            where = f"{checkpointer.directory / str(good)} (intact)" if good is not None else "none was written yet"
            raise TrainingDiverged(
                f"the loss became NaN or Inf at step {m['first_bad_step'] + 1}; the run stopped. Last good "
                f"checkpoint: {where}. Lower --lr, add --clip-grad-norm 1.0, or check the data"
            )
        now = time.perf_counter()
        rate = images_since_log / max(now - time_since_log, 1e-9)
        images_since_log, time_since_log = 0, now
        record = {"type": "train", "step": step, "epoch": epoch + 1, "loss": m["loss"], "accuracy": m["accuracy"],
                  "lr": float(trainer.schedule(step - 1)), "images_per_second": rate}  # fmt: skip
        log.write(record)
        return record

    def run_eval(epoch: int) -> dict[str, Any]:
        nonlocal last_eval
        result = trainer.evaluate(val_data)
        last_eval = result
        best = meta["best_val_accuracy"]
        if best is None or result["val_accuracy"] > best:
            meta.update(best_val_accuracy=result["val_accuracy"], best_step=step)
        log.write({"type": "eval", "step": step, "epoch": epoch + 1,
                   **{k: result[k] for k in ("val_loss", "val_accuracy", "val_top5_accuracy", "val_count")}})  # fmt: skip
        return result

    # ---- loop --------------------------------------------------------------------------------------------------
    epoch = meta["epoch"]
    compile_seconds = None
    ctrl_c = _DeferredInterrupt(defer=processes == 1)
    local_batch = config.batch_size // processes
    try:
        while epoch < config.epochs:
            cursor = EpochCursor(train_data, epoch, _from_json_safe(meta["data_state"]), meta["batch_in_epoch"])
            bar = tqdm(total=steps_per_epoch, initial=cursor.consumed, desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=not (config.progress and is_main), unit="step", dynamic_ncols=True)  # fmt: skip
            clock = time.perf_counter()
            full_batches = ((b, pos) for b, pos in cursor if len(b["label"]) == local_batch)
            for batch, (position, data_state) in trainer.prefetch(full_batches):
                trainer.state = trainer.train_step(trainer.state, batch)
                step += 1
                if compile_seconds is None:  # one sync, once: keep compilation out of the throughput
                    jax.block_until_ready(trainer.state.step)
                    compile_seconds = time.perf_counter() - clock
                    clock = time_since_log = time.perf_counter()
                else:
                    images_since_log += config.batch_size
                    meta["train_images"] += config.batch_size
                bar.update(1)
                if step % config.log_every == 0:
                    r = log_train(epoch)
                    bar.set_postfix(loss=f"{r['loss']:.4f}", acc=f"{r['accuracy']:.3f}", img_s=f"{r['images_per_second']:.0f}")
                meta.update(epoch=epoch, batch_in_epoch=position, data_state=data_state)
                ctrl_c.stop_here()  # state, step and data position agree: a safe point to stop
                mid_epoch = position < steps_per_epoch
                if mid_epoch and config.eval_every and step % config.eval_every == 0 and val_data is not None:
                    meta["train_seconds"] += time.perf_counter() - clock
                    save(run_eval(epoch)["val_accuracy"])
                    clock = time_since_log = time.perf_counter()
                elif mid_epoch and config.checkpoint_every and step % config.checkpoint_every == 0:
                    save()
                if not mid_epoch:
                    break
            bar.close()
            meta["train_seconds"] += time.perf_counter() - clock
            if step % config.log_every:
                log_train(epoch)
            epoch += 1
            meta.update(epoch=epoch, batch_in_epoch=0, data_state=None)
            result = run_eval(epoch - 1) if val_data is not None else None
            if result is not None and is_main:
                print(f"epoch {epoch}/{config.epochs}: val loss {result['val_loss']:.4f}, "
                      f"top-1 {result['val_accuracy']:.4f}, top-5 {result['val_top5_accuracy']:.4f}")  # fmt: skip
            save(result["val_accuracy"] if result else None)
            skipped = getattr(train_data, "skipped", None)
            if skipped is not None and skipped.epochs.get(epoch - 1) and is_main:
                print(f"epoch {epoch}: skipped {len(skipped.epochs[epoch - 1])} unusable images "
                      f"(ids {skipped.epochs[epoch - 1][:10]}{' ...' if len(skipped.epochs[epoch - 1]) > 10 else ''})")  # fmt: skip
            images_since_log, time_since_log = 0, time.perf_counter()
            if on_epoch_end is not None:
                on_epoch_end(trainer, result or {})
            ctrl_c.stop_here()
    except KeyboardInterrupt:
        ctrl_c.restore()
        where = None
        if not ctrl_c.forced:  # meta holds the data position of the last step that ran
            try:
                checkpointer.wait()
                if checkpointer.latest_step() != step:  # (an epoch end has just saved this step)
                    save()
                where = f"checkpoint saved in {checkpointer.directory / str(step)}"
            except RuntimeError:  # the step still owned (donated) the state
                pass
        checkpointer.close()
        where = where or f"latest checkpoint: {checkpointer.latest_step()} in {checkpointer.directory}"
        raise TrainingInterrupted(
            f"interrupted at step {step}; {where}; to continue, run the same command with --run-dir {run_dir} --resume"
        ) from None
    except jax.errors.JaxRuntimeError as err:
        checkpointer.close()
        oom = out_of_memory_error(err, config)
        if oom is None and processes > 1:  # a collective that failed: a peer is gone (or going)
            who = f"process {jax.process_index()} of {processes}"
            message = distributed.peer_lost_message(who, distributed.resume_hint(run_dir))
            raise distributed.PeerProcessLost(f"{message} ({str(err).splitlines()[0]})") from err
        raise oom or err
    except BaseException:
        checkpointer.close()
        raise
    finally:
        ctrl_c.restore()
    checkpointer.close()

    # ---- results -----------------------------------------------------------------------------------------------
    final_model = trainer.current_model()
    summary = {
        "best_val_accuracy": meta["best_val_accuracy"],
        "final_val_accuracy": last_eval["val_accuracy"] if last_eval else None,
        "final_val_loss": last_eval["val_loss"] if last_eval else None,
        "final_val_top5_accuracy": last_eval["val_top5_accuracy"] if last_eval else None,
        "best_step": meta["best_step"],
        "epochs": config.epochs,
        "steps": step,
        "wall_seconds": time.perf_counter() - started,
        "train_images_per_second": meta["train_images"] / max(meta["train_seconds"], 1e-9),
        "compile_seconds": compile_seconds,
        "devices": len(trainer.mesh.devices.flat),
    }
    if is_main:
        _export(final_model, run_dir / "model")
        if last_eval is not None:
            eval_record = {"class_names": list(final_model.label_names or []), **last_eval}
            (run_dir / "eval.json").write_text(json.dumps(eval_record))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if hasattr(train_data, "write_report"):  # unusable images met (flaxvision.data loaders)
            train_data.write_report(run_dir)
        if hasattr(val_data, "skipped"):
            (run_dir / "skipped_images_val.json").write_text(json.dumps(val_data.skipped.to_dict(), indent=2))
        if config.report:
            from flaxvision.report import write_report

            write_report(run_dir, model=final_model, train_data=train_data, val_data=val_data)
    distributed.barrier("flaxvision:fit-done")  # the others wait while process 0 writes (no shutdown timeout)
    return FitResult(summary=summary, model=final_model, run_dir=run_dir, trainer=trainer)


def _data_state_for_this_process(meta: dict[str, Any]) -> Any:
    """This process's data-iterator state from a checkpoint's meta, whatever the process count that saved it.

    Positions count global batches, so they carry over to any process count with the same global batch size;
    with another count, process i takes the state of process min(i, saved - 1) and the skipped-image log of all.
    """
    states = meta.get("data_states") or [meta.get("data_state")]
    mine = states[min(jax.process_index(), len(states) - 1)]
    if len(states) != jax.process_count() and isinstance(mine, dict) and "skipped" in mine:
        merged: dict[str, list] = {}
        for state in states:
            for epoch, ids in (state or {}).get("skipped", {}).items():
                merged.setdefault(epoch, []).extend(i for i in ids if i not in merged[epoch])
        mine = {**mine, "skipped": merged}
    return mine


def check_class_count(model: Any, count: int) -> None:
    """Labels beyond the head would train silently wrong: the data's class count must be the model's."""
    if count != model.config.num_classes:
        raise FlaxvisionError(
            f"the data has {count} classes but the model predicts {model.config.num_classes}; "
            "build the model with num_classes matching the data"
        )


def _run_record(config: TrainConfig, trainer: Trainer, class_names: list[str] | None) -> dict[str, Any]:
    return {
        "train_config": config.to_dict(),
        "model_config": {"family": trainer.model.family, **dataclasses.asdict(trainer.model.config)},
        "preprocessing": trainer.model.preprocessing.to_dict(),
        "class_names": list(class_names) if class_names else None,
        "steps_per_epoch": trainer.steps_per_epoch,
        "total_steps": trainer.total_steps,
        "devices": [str(d) for d in trainer.mesh.devices.flat],
        "jax_version": jax.__version__,
    }


def _build_model(config: TrainConfig, *, num_classes: int | None, in_chans: int | None = None) -> Any:
    from flaxvision.models import create_model

    kwargs = dict(num_classes=num_classes, img_size=config.img_size, dtype=config.dtype, seed=config.seed)
    if config.pretrained:
        return create_model(config.model, pretrained=config.pretrained, head_init=config.head_init, **kwargs,
                            **config.model_overrides)  # fmt: skip
    return create_model(config.model, in_chans=in_chans, **kwargs, **config.model_overrides)


def data_from_config(config: TrainConfig, model: Any = None) -> tuple[Any, Any, list[str], Any, Callable]:
    """Open `config.dataset` and build (train loader, val loader, class names, model, device preprocess)."""
    from flaxvision import data

    if not config.dataset:
        raise FlaxvisionError("no dataset given: pass --dataset (a Hub id, a save_to_disk directory, parquet files or an image folder)")
    classes: Any = config.classes
    if isinstance(classes, str) and classes.isdigit():
        classes = int(classes)
    splits = data.load(
        config.dataset, train_split=config.train_split, val_split=config.val_split, classes=classes,
        max_train_samples=config.max_train_samples, max_val_samples=config.max_val_samples,
        val_fraction=config.val_fraction, seed=config.seed,
    )  # fmt: skip
    class_names = list(splits.class_names)
    if model is None:
        model = _build_model(config, num_classes=len(class_names), in_chans=splits.train.num_channels)
    check_class_count(model, len(class_names))
    augment = {
        "rrc": data.AugmentConfig(scale=(config.rrc_scale_min, 1.0), hflip=config.hflip, brightness=config.color_jitter,
                                  contrast=config.color_jitter, saturation=config.color_jitter),
        "cifar": data.AugmentConfig(crop="pad_crop", hflip=config.hflip, brightness=0.0, contrast=0.0, saturation=0.0),
        "none": data.AugmentConfig(crop="resize", hflip=False, brightness=0.0, contrast=0.0, saturation=0.0),
    }[config.augment]  # fmt: skip
    # Each process reads only its slice of every global batch (see flaxvision.data.pipeline).
    per_process = lambda size: size // jax.process_count()  # noqa: E731
    common = dict(preprocessing=model.preprocessing, seed=config.seed, workers=config.workers, to_device=False,
                  shard_index=jax.process_index(), shard_count=jax.process_count())  # fmt: skip
    train = data.make_loader(splits.train, batch_size=per_process(config.batch_size), train=True, augment=augment, **common)
    val = data.make_loader(splits.val, batch_size=per_process(config.global_eval_batch_size), train=False, **common)
    dtype = jnp.dtype(model.config.dtype)
    return train, val, class_names, model, lambda images, key: train.device_preprocess(images, key, dtype)


def _export(model: Any, directory: Path) -> None:
    """Write the final model with its label names where flaxvision.load_pretrained reads it.

    ViTs go out in transformers format (ViTForImageClassification.from_pretrained reads them too) unless they use
    something that format cannot hold (average pooling, ...); everything else in flaxvision's own format.
    """
    from flaxvision.weights import save_pretrained

    if model.family == "vit":
        try:
            save_pretrained(model, directory, format="transformers")
            return
        except FlaxvisionError as err:
            print(f"flaxvision: model/ in flaxvision format ({err})")
    save_pretrained(model, directory, format="flaxvision")
