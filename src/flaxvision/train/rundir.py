"""The run directory: one object owns its lock, its files and the rules that keep them from being lost.

    runs/x/
      .lock            exists while a process works on the run (pid, host); a killed holder's lock is taken over
      config.json      the recipe (TrainConfig), model config, class names; changes accepted on resume
      metrics.jsonl    one record per logged step and per evaluation
      checkpoints/     Orbax run state (train.checkpoint)
      diverged.json    written when a run stops on NaN/Inf: the bad step and the last good checkpoint
      model/           the final model (export; a LoRA run's merged), eval.json, summary.json (written last: finished)
      adapter/         a LoRA run's adapter on its own (flaxvision.weights.adapter): adapter_config.json, adapter_model.safetensors
      *.png, report.html
      tensorboard/, wandb/, mlruns/, tracking.json   --log-to's trackers and their run ids (train.tracking)

Rules: nothing is written before every check has passed; every file is written atomically (flaxvision.files);
a finished run is never changed except by --overwrite, which validates the whole recipe first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from flaxvision import files
from flaxvision.errors import ConfigError, FlaxvisionError

# What a finished or started run leaves; --overwrite removes exactly these (nothing else the user put there).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "eval.json", "eval_ema.json", "diverged.json", "report.html",
             "skipped_images.json", "skipped_images_val.json", "tracking.json")  # fmt: skip
RUN_DIRS = ("checkpoints", "model", "model_ema", "adapter", "tensorboard", "wandb", "mlruns")
# TrainConfig fields that change how a run is watched, not what it computes: free to differ on resume.
# Fields that change how a run goes, not what it computes (steps_per_dispatch: K steps per call, same results).
NOT_RECIPE = ("progress", "report", "workers", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "steps_per_dispatch", "profile", "in_memory_max_gb", "log_to")


class RunInUse(FlaxvisionError):
    """Another live process holds the run directory."""


class RunDirectory:
    """One run's directory. Only process 0 writes; the others read (see `lock`)."""

    def __init__(self, path: str | os.PathLike, *, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self._lock_fd: int | None = None

    # ---- paths and state -------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return self.file("summary.json").is_file()

    @property
    def holds_run(self) -> bool:
        from flaxvision.train.checkpoint import has_checkpoints

        return self.finished or self.file("metrics.jsonl").exists() or has_checkpoints(self.checkpoints)

    def read_json(self, name: str) -> Any:
        return files.read_json(self.file(name))

    # ---- checks before anything is written ---------------------------------------------------------------------
    def check_mode(self, *, resume: bool, overwrite: bool) -> str:
        """'new', 'resume', 'overwrite' or 'finished' (resume of a finished run: nothing to do); raise otherwise."""
        if resume and overwrite:
            raise FlaxvisionError("--resume and --overwrite exclude each other: --resume continues the run in "
                                  f"{self.path}, --overwrite deletes it; pass one")  # fmt: skip
        if self.path.exists() and not self.path.is_dir():
            raise FlaxvisionError(f"run directory {self.path} is a file; pass a directory")
        if resume:
            if self.finished:
                return "finished"
            from flaxvision.train.checkpoint import has_checkpoints

            if not has_checkpoints(self.checkpoints):
                raise FlaxvisionError(f"no checkpoint in {self.checkpoints} to resume from; start the run without --resume "
                                      "(or with --overwrite to replace what the directory holds)")  # fmt: skip
            return "resume"
        if overwrite:
            return "overwrite"
        if self.holds_run:
            raise FlaxvisionError(f"{self.path} already holds a run; pass --resume to continue it or --overwrite to replace it")
        return "new"

    def saved_recipe(self) -> dict[str, Any] | None:
        record = self.read_json("config.json")
        return record.get("train_config") if isinstance(record, dict) else None

    def recipe_changes(self, config: Any) -> dict[str, list[Any]]:
        """Fields of `config` that differ from the recipe in config.json: {field: [saved, now]}."""
        saved = self.saved_recipe()
        if saved is None:
            return {}
        from flaxvision.train.config import RECORDED_BEFORE

        now = config.to_dict()
        defaults = {**type(config)().to_dict(), **RECORDED_BEFORE}  # a field added later: what that run had
        return {k: [saved.get(k, defaults[k]), v] for k, v in now.items()
                if k not in NOT_RECIPE and _differs(_canonical(k, saved.get(k, defaults[k])), _canonical(k, v))}  # fmt: skip

    def check_changes(self, config: Any, *, allow: bool) -> dict[str, list[Any]]:
        """On resume: the recipe changes, when they are allowed; else one clear error. Changes that alter what a
        checkpoint holds (the trained parameters, the optimizer state, the EMA) are never accepted."""
        changes = self.recipe_changes(config)
        fixed = state_changes(changes)
        if fixed:
            listed = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in fixed)
            raise ConfigError(f"--resume cannot change {listed}: the checkpoints in {self.checkpoints} were made "
                              "(and the best one chosen) under the saved value; drop those options to continue the "
                              "run, or start a new run (another --run-dir) from this one's model/ with --pretrained")  # fmt: skip
        if changes and not allow:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ConfigError(f"--resume with a recipe that differs from {self.file('config.json')}: {listed}; drop "
                              "those options to resume as it was, or pass --allow-changes to continue with them "
                              "(recorded)")  # fmt: skip
        return changes

    # ---- the lock ------------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the run directory for this process (process 0 of a multi-process run), or fail naming the holder.

        The lock is a kernel lock (flock) on `.lock`, so it goes with its process: a killed holder leaves a file
        with its pid but no lock, which the next process takes over. The file keeps the holder's pid and host for
        the message a second process prints.
        """
        files.make_dirs(self.path)
        path = self.file(".lock")
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise files.storage_error(err, path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunInUse(
                    f"{self.path} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since "
                    f"{holder.get('since', '?')}); wait for it to finish, stop it, or choose another --run-dir"
                ) from None
            # The holder before us removes the file when it lets go: a lock on a file that has lost its name
            # protects nothing, so try again on the one the name points to now.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_holder(fd)
        if previous.get("pid") and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
            print(f"flaxvision: took over the lock of {self.path} left by pid {previous['pid']} on {previous.get('host')} (no longer running)")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._lock_fd = fd

    def check_shared(self) -> None:
        """Multi-process runs: process 0 holds the lock; every other process must see that same lock (the same
        directory, on a shared filesystem), else two runs would write one directory. Every process calls this."""
        import jax

        from flaxvision import distributed

        if jax.process_count() == 1:
            return
        lead = distributed.allgather_json(self.holder() if self.is_main else None)[0]
        if not self.is_main and self.holder() != lead:
            raise FlaxvisionError(
                f"process {jax.process_index()} does not see process 0's lock in {self.path} (it sees {self.holder() or 'none'}); "
                "every process needs the same --run-dir on a filesystem they share"
            )

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.file(".lock").read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def unlock(self) -> None:
        """Release the lock and remove its file (while still holding it; `lock` retries on a file that lost its
        name), so a command leaves no trace in the directory."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            self.file(".lock").unlink()
        os.close(self._lock_fd)
        self._lock_fd = None

    def remove_if_empty(self) -> None:
        """A new run that failed before writing anything leaves no directory behind."""
        with contextlib.suppress(OSError):
            if not any(self.path.iterdir()):
                self.path.rmdir()

    # ---- writing ---------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """--overwrite, after validation: remove what a run left (and nothing else)."""
        import shutil

        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                self.file(name).unlink()
        for name in RUN_DIRS:
            shutil.rmtree(self.file(name), ignore_errors=True)
        for png in self.path.glob("*.png"):
            png.unlink(missing_ok=True)

    def write_json(self, name: str, value: Any) -> None:
        if self.is_main:
            files.write_json(self.file(name), value)

    def weights_dir(self, weights: str = "raw") -> Path:
        """model/ (the raw weights) or model_ema/ (their EMA, for runs with --ema-decay)."""
        return self.model_dir if weights == "raw" else self.path / "model_ema"

    def export_model(self, model: Any, weights: str = "raw", *, lora_base: str | None = None) -> Path:
        """Write the final model with its label names into model/ (or model_ema/), atomically, in its family's
        preferred format.

        A model with LoRA adapters goes there merged (what predict, evaluate, export and the report read); the raw
        weights' adapter alone also goes to adapter/ (atomically too), recorded as trained on `lora_base` (None:
        from scratch).
        """
        from flaxvision.models.lora import lora_spec, merge_lora
        from flaxvision.weights import save_adapter, save_pretrained

        adapted = lora_spec(model) is not None
        plain = merge_lora(model) if adapted else model
        formats = _export_formats(plain)
        with files.atomic_directory(self.weights_dir(weights), overwrite=True) as tmp:
            for fmt in formats:
                try:
                    save_pretrained(plain, tmp, format=fmt)
                    break
                except FlaxvisionError as err:
                    if fmt == formats[-1]:
                        raise
                    print(f"flaxvision: {self.weights_dir(weights).name}/ not in {fmt} format ({err}); trying {formats[formats.index(fmt) + 1]}")
                    for leftover in tmp.iterdir():
                        leftover.unlink()
        if weights != "raw":
            return self.weights_dir(weights)
        if adapted:
            save_adapter(model, self.adapter_dir, base=lora_base, overwrite=True)
        elif self.adapter_dir.exists():  # left by an earlier LoRA recipe of this run: it is not this model's
            import shutil

            shutil.rmtree(self.adapter_dir, ignore_errors=True)
        return self.model_dir


class MetricsLog:
    """metrics.jsonl: one JSON record per logged step and per evaluation (process 0 only), appended line by line;
    each record also goes to `trackers` (train.tracking.Trackers: --log-to), after it is in the file."""

    def __init__(self, path: Path, enabled: bool = True, trackers: Any = None):
        self.path, self.enabled, self.trackers = path, enabled, trackers

    def truncate_after(self, step: int) -> None:
        """On resume: drop records a killed run wrote after its last checkpoint (rewritten atomically)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in files.read_lines(self.path) if _record_step(line) <= step]
        files.write_atomic(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            files.append_line(self.path, json.dumps(record))
            if self.trackers is not None:
                self.trackers.log_record(record)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in files.read_lines(self.path)]


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")  # a damaged line is dropped


def _export_formats(model: Any) -> tuple[str, ...]:
    """The family's preferred format (ViTs: transformers, which ViTForImageClassification reads too), then
    flaxvision's own, which holds everything (a ViT with average pooling, say)."""
    from flaxvision.weights.layouts import export_formats

    first = export_formats(model.config)[0]
    return (first, "flaxvision") if first != "flaxvision" else ("flaxvision",)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, json.JSONDecodeError):
        return {}


# Recipe fields whose change alters the shapes of the trained state: what is trained (and so what has optimizer
# state), the optimizer's own state, the EMA. A checkpoint cannot be restored into such a state.
_MODEL_SHAPES_KEEP = ("drop_path_rate", "dropout_rate", "attention_dropout_rate", "remat", "scan_blocks")


def state_changes(changes: dict[str, list[Any]]) -> list[str]:
    """The fields of `changes` ({field: [saved, now]}) that no checkpoint of the saved recipe can continue."""
    def on(field: str, value: Any) -> bool:
        return value is not None and not (field == "layer_decay" and value >= 1.0) and value != 0

    def overrides(value: Any) -> dict:
        return {k: v for k, v in (value or {}).items() if k not in _MODEL_SHAPES_KEEP}

    fixed = []
    for field, (saved, now) in changes.items():
        # best_by: the best checkpoint so far was chosen by the other weights' score.
        if field in ("model", "img_size", "optimizer", "train_only", "freeze", "lora_rank", "lora_targets", "best_by"):
            fixed.append(field)
        elif field in ("ema_decay", "clip_grad_norm", "layer_decay", "momentum") and on(field, saved) != on(field, now):
            fixed.append(field)
        elif field == "model_overrides" and overrides(saved) != overrides(now):
            fixed.append(field)
    return fixed


def _canonical(field: str, value: Any) -> Any:
    """A recipe value as compared on resume: LoRA targets in canonical order ("v,q" is "q,v")."""
    if field == "lora_targets" and isinstance(value, str):
        from flaxvision.models.lora import parse_targets

        try:
            return ",".join(parse_targets(value))
        except FlaxvisionError:
            return value
    return value


def _differs(saved: Any, now: Any) -> bool:
    if isinstance(saved, (list, tuple)) or isinstance(now, (list, tuple)):
        return list(saved or []) != list(now or [])
    if isinstance(saved, (int, float)) and isinstance(now, (int, float)) and not isinstance(saved, bool):
        return float(saved) != float(now)
    return saved != now
