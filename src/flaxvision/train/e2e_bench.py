"""End-to-end training benchmark: a preset's whole recipe in flaxvision against the same model and recipe in plain
PyTorch eager (train/torch_reference.py), on one dataset, in the same run on the same machine.

    flaxvision bench e2e --preset mnist-cnn --generate 60000 --epochs 2          # benchmarks/e2e.sh has the rows

As in train/benchmark.py, each side runs in a fresh process of its own, one after the other. The flaxvision side
is `flaxvision.train.fit` with the preset's recipe (plus --set overrides), exactly as `flaxvision train` runs it,
so whatever the trainer does (its input pipeline, its steps) is what is measured. Both sides are timed with this
module's own clock, not the trainer's printed numbers:

- wall seconds: flaxvision, the whole `fit` call (reading the dataset's index, building the model, compiling,
  every epoch with its evaluation and checkpoint, the export of the model); torch, from building the model to
  the end of the last evaluation (the one-off decode into tensors is reported apart, as `decode_seconds`).
- training images/s: the images of epochs 2..N over their training time (an epoch's time between the ends of
  epochs, less its evaluation; flaxvision's includes its checkpoint save), so the first epoch's compilation
  (and torch's warm-up) stays out. With one epoch it is the first epoch's rate, marked `steady: false`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flaxvision import host_memory
from flaxvision.errors import ConfigError, FlaxvisionError
from flaxvision.train.config import TrainConfig

TORCH_SCRIPT = Path(__file__).with_name("torch_reference.py")
TORCH_MODELS = ("cnn", "resnet18_cifar")  # torch_reference.MODELS (that file is not imported here: it needs torch)


class TorchMissing(FlaxvisionError):
    """The PyTorch side cannot run: torch is not installed."""


# ---- recipe overrides ----------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """`FIELD=VALUE` (a TrainConfig field) -> (field, value parsed to the field's type; "none" is None).

    >>> parse_override("epochs=2"), parse_override("hflip=false")
    (('epochs', 2), ('hflip', False))
    """
    from flaxvision.errors import did_you_mean
    from flaxvision.train.config import field_types

    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    kinds = field_types()
    if not sep or name not in kinds:
        hint = did_you_mean(name, kinds) if sep else ""
        raise ConfigError(f"--set {text!r}: expected FIELD=VALUE with a training option as FIELD{hint}, e.g. --set workers=0")
    kind = kinds[name]
    try:
        if raw.lower() in ("none", "null"):
            return name, None
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return name, raw.lower() in ("true", "1", "yes")
        if kind is dict:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError
            return name, value
        return name, kind(raw)
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"--set {text!r}: {raw!r} is not a {getattr(kind, '__name__', kind)} value for {name}") from None


# Recipe fields the PyTorch side does not reproduce, with the value it does: another value on the flaxvision side
# would compare two different recipes.
_TORCH_MIRRORS = {
    "pretrained": None, "model_overrides": {}, "dtype": "float32", "classes": None, "max_train_samples": None,
    "max_val_samples": None, "randaugment": None, "trivialaugment": False, "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0,
    "schedule": "constant", "warmup_steps": 0, "clip_grad_norm": None, "layer_decay": None, "ema_decay": None,
    "lora_rank": None, "train_only": None, "freeze": None,
}  # fmt: skip


def check_torch_recipe(config: TrainConfig) -> None:
    """A one-line ConfigError for a recipe the PyTorch side does not reproduce."""
    if config.model not in TORCH_MODELS:
        raise ConfigError(f"model={config.model!r}: the PyTorch side has {', '.join(TORCH_MODELS)} only; pass --no-torch")
    for field, mirrored in _TORCH_MIRRORS.items():
        if getattr(config, field) != mirrored:
            raise ConfigError(f"{field}={getattr(config, field)!r}: the PyTorch side runs {field}={mirrored!r}; drop that "
                              "--set or pass --no-torch")  # fmt: skip
    if config.augment not in ("none", "cifar"):
        raise ConfigError(f"augment={config.augment!r}: the PyTorch side has none and cifar; pass --no-torch")
    if config.augment == "cifar" and not config.hflip:
        raise ConfigError("hflip=False: the PyTorch side's cifar augmentation always flips; pass --no-torch")


def torch_spec(config: TrainConfig, dataset: str, threads: int | None = None) -> dict[str, Any]:
    """What torch_reference.train needs of the recipe and the dataset (checked: check_torch_recipe)."""
    from flaxvision.data.sources import resolve_kind
    from flaxvision.models import model_config
    from flaxvision.models.registry import default_preprocessing

    check_torch_recipe(config)
    if resolve_kind(dataset) != "disk":
        raise ConfigError(f"dataset {dataset!r}: the PyTorch side reads save_to_disk directories only; pass one "
                          "(or --generate N) or --no-torch")  # fmt: skip
    model = model_config(str(config.model), img_size=config.img_size)  # one of TORCH_MODELS (checked above)
    prep = default_preprocessing(model)
    return {
        "dataset": dataset, "train_split": config.train_split, "val_split": config.val_split or "test",
        "model": config.model, "in_chans": model.in_chans, "img_size": model.img_size, "num_classes": model.num_classes,
        "mean": list(prep.mean), "std": list(prep.std), "optimizer": config.optimizer, "lr": config.lr,
        "b1": config.b1, "b2": config.b2, "weight_decay": config.weight_decay, "momentum": config.momentum,
        "nesterov": config.nesterov, "batch_size": config.batch_size, "eval_batch_size": config.global_eval_batch_size,
        "epochs": config.epochs, "augment": config.augment, "label_smoothing": config.label_smoothing,
        "seed": config.seed, "threads": threads,
    }  # fmt: skip


# ---- the flaxvision side (in its child process) ------------------------------------------------------------------


def run_flaxvision(config: TrainConfig) -> dict[str, Any]:
    """`fit(config)` into a temporary run directory, timed per epoch from outside the trainer."""
    import flax
    import jax

    import flaxvision
    from flaxvision.train import Trainer, fit
    from flaxvision.train.session import Session

    # Our clock, at the points fit exposes: the session's start (after data, model and compilation set-up), each
    # Trainer.evaluate call, each epoch's end (on_epoch_end, after its evaluation and checkpoint).
    marks: dict[str, Any] = {"session": None, "evals": [], "ends": []}
    evaluate, session_run = Trainer.evaluate, Session.run

    def timed_evaluate(self, *args, **kwargs):
        clock = time.perf_counter()
        try:
            return evaluate(self, *args, **kwargs)
        finally:
            marks["evals"].append((clock, time.perf_counter()))

    def timed_run(self, *args, **kwargs):
        marks["session"] = time.perf_counter()
        return session_run(self, *args, **kwargs)

    Trainer.evaluate, Session.run = timed_evaluate, timed_run  # pyright: ignore[reportAttributeAccessIssue]
    accuracies: list[float | None] = []

    def epoch_end(_: Any, result: dict[str, Any]) -> None:
        marks["ends"].append(time.perf_counter())
        accuracies.append(result.get("val_accuracy"))

    with tempfile.TemporaryDirectory(prefix="flaxvision-e2e-") as run_dir:
        start = time.perf_counter()
        result = fit(config, run_dir=run_dir, on_epoch_end=epoch_end)
        wall = time.perf_counter() - start
    summary = result.summary
    images_per_epoch = summary["steps"] // config.epochs * config.batch_size
    epochs, previous = [], marks["session"] or start
    for end, accuracy in zip(marks["ends"], accuracies, strict=True):
        eval_seconds = sum(b - a for a, b in marks["evals"] if previous <= a < end)
        epochs.append({"train_seconds": end - previous - eval_seconds, "eval_seconds": eval_seconds,
                       "train_images": images_per_epoch, "val_accuracy": accuracy})  # fmt: skip
        previous = end
    return {
        "epochs": epochs, "wall_seconds": wall, "setup_seconds": (marks["session"] or start) - start,
        "trainer_compile_seconds": summary.get("compile_seconds"),
        "trainer_images_per_second": summary.get("train_images_per_second"),
        "device": str(jax.devices()[0]), "device_count": jax.device_count(),
        "jax_version": jax.__version__, "flax_version": flax.__version__, "flaxvision_version": flaxvision.__version__,
    }  # fmt: skip


# ---- both sides ----------------------------------------------------------------------------------------------------


def _child(cmd: list[str], side: str) -> dict[str, Any]:
    done = subprocess.run(cmd, capture_output=True, text=True, env=host_memory.environment() or os.environ)
    if done.returncode != 0:
        if side == "torch" and "No module named 'torch'" in done.stderr:
            raise TorchMissing("the PyTorch side needs torch: pip install torch (or pass --no-torch)")
        raise FlaxvisionError(f"the {side} side of bench e2e failed (exit {done.returncode}): "
                              + " | ".join(done.stderr.strip().splitlines()[-3:]))  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rates(side: dict[str, Any]) -> dict[str, Any]:
    """Training images/s of epochs 2..N (all of epoch 1 when there is one), the final accuracy."""
    epochs = side["epochs"]
    timed = epochs[1:] or epochs
    images = sum(e["train_images"] for e in timed)
    return {
        "images_per_second": images / max(sum(e["train_seconds"] for e in timed), 1e-9),
        "steady": len(epochs) > 1, "first_epoch_seconds": epochs[0]["train_seconds"],
        "final_accuracy": epochs[-1]["val_accuracy"],
    }  # fmt: skip


def machine() -> dict[str, Any]:
    from flaxvision.train.instrument import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}


def benchmark_e2e(config: TrainConfig, *, preset: str, torch: bool = True, torch_threads: int | None = None) -> dict[str, Any]:
    """Both sides on `config.dataset`; the keys of `flaxvision bench e2e --json`. torch_threads None: every core."""
    import importlib.util

    assert config.dataset is not None
    if torch and importlib.util.find_spec("torch") is None:
        raise TorchMissing("the PyTorch side needs torch: pip install torch (or pass --no-torch for flaxvision alone)")
    spec = torch_spec(config, config.dataset, torch_threads) if torch else None  # a recipe torch cannot run fails before any work
    ours = _child([sys.executable, "-m", "flaxvision.train.e2e_bench", json.dumps(config.to_dict())], "flaxvision")
    result: dict[str, Any] = {
        "preset": preset, "dataset": config.dataset, "epochs": config.epochs, "batch_size": config.batch_size,
        "model": config.model, "flaxvision": {**ours, **_rates(ours)}, "torch": None, "machine": machine(),
    }  # fmt: skip
    if spec is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        try:
            ref = _child([sys.executable, str(TORCH_SCRIPT), f.name], "torch")
        finally:
            os.unlink(f.name)
        result["torch"] = {**ref, **_rates(ref)}
        fv, tr = result["flaxvision"], result["torch"]
        result["ratio"] = {"images_per_second": fv["images_per_second"] / tr["images_per_second"],
                           "wall_seconds": fv["wall_seconds"] / tr["wall_seconds"]}  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    """The flaxvision side's child: argv[0] is the recipe as JSON; prints the side's result on its last line."""
    parser = argparse.ArgumentParser(description="the flaxvision side of `flaxvision bench e2e` (a child process)")
    parser.add_argument("recipe", help="TrainConfig.to_dict() as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(run_flaxvision(TrainConfig.from_dict(json.loads(args.recipe)))))


if __name__ == "__main__":
    main()
