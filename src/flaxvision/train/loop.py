"""The training loop: `fit` reads top to bottom; each stage it calls lives in its own module.

    result = flaxvision.train.fit(TrainConfig(...), run_dir="runs/x")                      # data from config
    result = flaxvision.train.fit(config, run_dir="runs/x", train_data=loader, val_data=val_loader)

Stages: run directory checks and lock (train.rundir) -> model and loaders from the recipe (train.recipe) -> mesh,
sharded state and compiled steps (train.trainer, with the device stage of data.device) -> resume from the newest
intact checkpoint (train.checkpoint) -> epochs of steps with evaluation (train.evaluation) and checkpoints ->
results: model/, eval.json, summary.json, the report.

`train_data` is anything re-iterable that yields one epoch of batches per `iter()`: a flaxvision.data loader, a
torch DataLoader with a NumPy collate, or a list of dicts. A batch is {"image": (B, H, W, C), "label": (B,)}
(or an (image, label) tuple); images are uint8 pixels (normalised on the device with the model's mean/std) or
already-normalised floats. Exact resume uses the iterator's get_state/set_state when it has them, and otherwise
re-creates the epoch and skips the batches already consumed (exact for any deterministic iterable).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax

from flaxvision import distributed
from flaxvision.errors import FlaxvisionError
from flaxvision.train import recipe, tracking
from flaxvision.train.checkpoint import Checkpointer, Progress
from flaxvision.train.config import TrainConfig
from flaxvision.train.rundir import MetricsLog, RunDirectory
from flaxvision.train.session import Session
from flaxvision.train.trainer import Trainer


@dataclasses.dataclass
class FitResult:
    summary: dict[str, Any]  # the content of summary.json
    model: Any  # the final model (eval mode), with its label names; None for a run that was already finished
    run_dir: Path
    trainer: Trainer | None  # live state, compiled steps (e.g. for further evaluation)
    already_finished: bool = False  # resume of a finished run: nothing was done


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
    allow_changes: bool = False,
    on_epoch_end: Callable[[Trainer, dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train `config` (or `model` on `train_data`), write the run directory, return the summary and final model.

    Args:
      config: the recipe (see TrainConfig; presets are TrainConfigs).
      run_dir: where config.json, metrics.jsonl, summary.json, checkpoints/ and model/ go.
      model: a flaxvision model; None builds `config.model` (pretrained from `config.pretrained`). With
        `config.lora_rank` it gets LoRA adapters (in place; see flaxvision.models.lora): only they and the head train,
        model/ holds the merged model and adapter/ the adapter alone.
      train_data / val_data: re-iterable batch sources (None: built from `config.dataset`).
      class_names: label names (taken from the data source when it has `class_names`).
      steps_per_epoch: batches per epoch when `len(train_data)` is not defined.
      preprocess: `(images, key_or_None) -> model inputs` on the device; default: normalise with the model's
        mean/std, with the recipe's colour jitter when the data comes from `config.dataset` (key is None at eval).
      resume: continue from the newest intact checkpoint in run_dir (a finished run: nothing to do);
        overwrite: replace what run_dir holds, once everything else has been checked.
      allow_changes: on resume, accept a recipe that differs from the one in config.json (recorded there).
      on_epoch_end: called with (trainer, eval result) after each epoch's checkpoint.
    """
    # ---- run directory: checks that write nothing, then the lock ---------------------------------------------
    fit_started = time.perf_counter()
    is_main = jax.process_index() == 0
    run = RunDirectory(run_dir, is_main=is_main)
    mode = run.check_mode(resume=resume, overwrite=overwrite)
    if mode == "finished":
        return _already_finished(run)
    changes = run.check_changes(config, allow=allow_changes) if mode == "resume" else {}
    if is_main:
        tracking.check_packages(config.log_to)  # --log-to's packages, before anything is written
    if is_main:
        run.lock()
    try:
        run.check_shared()  # the other processes see process 0's lock: one directory for all
        run.check_mode(resume=resume, overwrite=overwrite)  # again, now that no one else can change it
        return _fit_locked(run, mode, config, changes, model=model, train_data=train_data, val_data=val_data,
                           class_names=class_names, steps_per_epoch=steps_per_epoch, preprocess=preprocess,
                           on_epoch_end=on_epoch_end, fit_started=fit_started)  # fmt: skip
    except BaseException:
        run.unlock()
        if mode == "new" and is_main:
            run.remove_if_empty()
        raise
    finally:
        run.unlock()


def _fit_locked(run: RunDirectory, mode: str, config: TrainConfig, changes: dict, *, model, train_data, val_data,
                class_names, steps_per_epoch, preprocess, on_epoch_end, fit_started) -> FitResult:  # fmt: skip
    # ---- model and data from the recipe (this also validates it: nothing is deleted before) ------------------
    jitter = getattr(train_data, "augment", None)  # a flaxvision loader's colour jitter, applied on the device
    if train_data is None:
        parts = recipe.build_run(config, model)
        model, train_data, val_data, class_names, jitter = parts.model, parts.train, parts.val, parts.class_names, parts.jitter
    class_names = class_names or getattr(train_data, "class_names", None)
    steps_per_epoch = _steps_per_epoch(train_data, steps_per_epoch)
    if model is None:
        model = recipe.build_model(config, num_classes=len(class_names) if class_names else None)
    if class_names:
        recipe.check_class_count(model, len(class_names))
        if model.label_names is None:
            model.label_names = tuple(class_names)
    model = recipe.with_lora(config, model)  # a given model gets the recipe's adapters too
    recipe.check_fits(config, model, jax.devices())

    # ---- mesh, sharded state, compiled steps ---------------------------------------------------------------------
    geometry = getattr(train_data, "device_geometry", None)  # an in-memory loader leaves crop and flip to the device
    trainer = Trainer(config, model, steps_per_epoch=steps_per_epoch, preprocess=preprocess, jitter=jitter,
                      geometry=geometry)  # fmt: skip
    checkpointer = Checkpointer(run.checkpoints, keep=config.keep_checkpoints) if mode != "overwrite" else None

    # ---- resume: the newest intact checkpoint (before the bad step of a diverged run) ------------------------------
    progress = Progress()
    diverged = run.read_json("diverged.json") if mode == "resume" else None
    if mode == "resume":
        assert checkpointer is not None
        at_most = diverged["last_good_step"] if diverged else None
        step, trainer.state, progress, skipped = checkpointer.restore_newest(trainer.state, at_most=at_most)
        progress.data_state = _data_state_for_this_process(progress)
        for s in skipped:
            print(f"flaxvision: {s}")
        if skipped and is_main_process():  # kept beside the run; new saves of those steps must not collide
            checkpointer.set_aside([s.step for s in skipped if s.step > step], run.file("damaged-checkpoints"))
        if diverged and is_main_process():
            dropped = checkpointer.delete_after(step)
            print(f"flaxvision: continuing the diverged run from its last good checkpoint {step}"
                  + (f" (removed the later checkpoints {dropped})" if dropped else ""))  # fmt: skip
        if skipped or diverged:  # every process's checkpoint manager sees what process 0 moved or removed
            distributed.barrier("flaxvision:checkpoints-tidied")
            checkpointer.manager.reload()
        if is_main_process():
            print(f"resumed from step {step} (epoch {progress.epoch + 1}, batch {progress.batch_in_epoch})"
                  + (f", saved by {progress.processes} processes" if progress.processes != jax.process_count() else ""))  # fmt: skip

    # ---- from here on the run directory changes --------------------------------------------------------------------
    if mode == "overwrite":
        if run.is_main:
            run.clear()
        distributed.barrier("flaxvision:run-dir-cleared")
        checkpointer = Checkpointer(run.checkpoints, keep=config.keep_checkpoints)
    assert checkpointer is not None
    start_step = int(jax.device_get(trainer.state.step))
    record = _run_record(config, trainer, class_names, previous=run.read_json("config.json") if mode == "resume" else None,
                         changes=changes, step=start_step)  # fmt: skip
    run.write_json("config.json", record)
    if diverged and run.is_main:
        run.file("diverged.json").unlink(missing_ok=True)
    trackers = tracking.Trackers.open(config.log_to, run.path, record, step=start_step, resumed=mode == "resume",
                                      is_main=run.is_main)  # fmt: skip
    with trackers.closing():  # on every way out: finished, interrupted, diverged, failed
        log = MetricsLog(run.file("metrics.jsonl"), enabled=run.is_main, trackers=trackers)
        if mode == "resume":
            log.truncate_after(start_step)  # what a killed run logged after it is redone
        return _train_and_finish(run, config, trainer, checkpointer, log, progress, trackers, record, train_data=train_data,
                                 val_data=val_data, on_epoch_end=on_epoch_end, fit_started=fit_started)  # fmt: skip


def _train_and_finish(run: RunDirectory, config: TrainConfig, trainer: Trainer, checkpointer: Checkpointer, log: MetricsLog,
                      progress: Progress, trackers: tracking.Trackers, record: dict[str, Any], *, train_data, val_data,
                      on_epoch_end, fit_started) -> FitResult:  # fmt: skip
    # ---- the epochs -----------------------------------------------------------------------------------------------
    session = Session(run, trainer, checkpointer, log, progress, train_data=train_data, val_data=val_data,
                      on_epoch_end=on_epoch_end, fit_started=fit_started)  # fmt: skip
    session.run()

    # ---- results: model/, eval.json, then summary.json (the run is finished) ---------------------------------------
    final_model = trainer.current_model()
    ema_model = trainer.current_model(weights="ema") if trainer.has_ema else None  # (every process gathers)
    summary = session.summary()
    if run.is_main:
        run.export_model(final_model, lora_base=config.pretrained)
        if ema_model is not None:
            run.export_model(ema_model, weights="ema")
        if session.last_eval is not None:
            names = {"class_names": list(final_model.label_names or [])}
            raw = {k: v for k, v in session.last_eval.items() if k != "ema"}
            run.write_json("eval.json", {**names, **raw})
            if "ema" in session.last_eval:
                run.write_json("eval_ema.json", {**names, **session.last_eval["ema"]})
        if hasattr(train_data, "write_report"):  # unusable images met (flaxvision.data loaders)
            train_data.write_report(run.path)
        if hasattr(val_data, "skipped"):
            run.write_json("skipped_images_val.json", val_data.skipped.to_dict())
        if config.report:
            from flaxvision.report import write_report

            write_report(run.path, model=final_model, train_data=train_data, val_data=val_data, stage=trainer.stage,
                         schedule=trainer.schedule)  # fmt: skip
            trackers.log_images(sorted(run.path.glob("*.png")))  # every figure the report drew
        trackers.log_hyperparameters(record, summary)
        run.write_json("summary.json", summary)
    for loader in (train_data, val_data):
        if hasattr(loader, "close"):
            loader.close()
    distributed.barrier("flaxvision:fit-done")  # the others wait while process 0 writes (no shutdown timeout)
    return FitResult(summary=summary, model=final_model, run_dir=run.path, trainer=trainer)


def is_main_process() -> bool:
    return jax.process_index() == 0


def _already_finished(run: RunDirectory) -> FitResult:
    summary = run.read_json("summary.json") or {}
    if is_main_process():
        print(f"flaxvision: {run.path} holds a run that already finished ({summary.get('steps', '?')} steps); "
              "nothing to resume. Its results are unchanged; use --overwrite to train it again")  # fmt: skip
    return FitResult(summary=summary, model=None, run_dir=run.path, trainer=None, already_finished=True)


def _steps_per_epoch(train_data: Any, given: int | None) -> int:
    if given is None:
        try:
            given = len(train_data)
        except TypeError:
            raise FlaxvisionError("train_data has no len(); pass steps_per_epoch") from None
    if given < 1:
        raise FlaxvisionError("the training data yields no full batch; lower --batch-size or add data")
    return given


def _data_state_for_this_process(progress: Progress) -> Any:
    """This process's data-iterator state, whatever the process count that saved it.

    Positions count global batches, so they carry over to any process count with the same global batch size;
    with another count, process i takes the state of process min(i, saved - 1) and the skipped-image log of all.
    """
    states = progress.data_states or [progress.data_state]
    mine = states[min(jax.process_index(), len(states) - 1)]
    if len(states) != jax.process_count() and isinstance(mine, dict) and "skipped" in mine:
        merged: dict[str, list] = {}
        for state in states:
            for epoch, ids in (state or {}).get("skipped", {}).items():
                merged.setdefault(epoch, []).extend(i for i in ids if i not in merged[epoch])
        mine = {**mine, "skipped": merged}
    return mine


def _run_record(config: TrainConfig, trainer: Trainer, class_names: list[str] | None, *, previous: dict | None,
                changes: dict, step: int) -> dict[str, Any]:  # fmt: skip
    history = list((previous or {}).get("resume_changes", []))
    if changes:
        history.append({"step": step, "changes": changes})
    return {
        "train_config": config.to_dict(),
        "model_config": {"family": trainer.model.family, **dataclasses.asdict(trainer.model.config)},
        "preprocessing": trainer.model.preprocessing.to_dict(),
        "class_names": list(class_names) if class_names else None,
        "steps_per_epoch": trainer.steps_per_epoch,
        "total_steps": trainer.total_steps,
        "devices": [str(d) for d in trainer.mesh.devices.flat],
        "jax_version": jax.__version__,
        **({"resume_changes": history} if history else {}),
    }
