"""Shared test helpers (test modules import shared code only from here, never from each other): tiny data and
models, directory snapshots, checkpoint damage, CLI runners, a tmpfs mount.

Also a script, for tests that need a fit in a child process (to kill it, lock against it, fill its disk):

    python tests/helpers.py fit SPEC_JSON                             # one tiny colour-data fit (see `_child`)
    python tests/helpers.py resume-fit RUN_DIR STEPS fresh|resume DELAY [RECIPE_JSON]   # the SIGKILL/resume tests' fit

Each prints its outcome as JSON on its last line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
REPO = HERE.parent
CLASS_NAMES = ["red", "green", "blue", "grey"]
TINY_VIT = dict(img_size=16, patch_size=4, width=32, num_heads=2, mlp_dim=64, depth=1)
# The trainer tests' tiny ViT (tests/test_train.py and its resume child): the same with two blocks.
TRAINER_VIT = {**TINY_VIT, "depth": 2}

# The tiny CLI recipe (builtin digits): 128 train images / batch 32 = 4 steps per epoch.
TINY_CLI = [
    "--dataset", "builtin:digits", "--max-train-samples", "128", "--max-val-samples", "64", "--batch-size", "32",
    "--model-overrides", json.dumps({"patch_size": 4, "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}),
    "--img-size", "16", "--no-report", "--no-progress", "--checkpoint-every", "2", "--keep-checkpoints", "3",
]  # fmt: skip


def tiny_cli_config(**kw):
    """The TrainConfig that `flaxvision train TINY_CLI ...` builds (the default preset plus the tiny overrides)."""
    from flaxvision.presets import DEFAULT_PRESET, get_preset

    base = dict(dataset="builtin:digits", max_train_samples=128, max_val_samples=64, batch_size=32,
                model_overrides={"patch_size": 4, "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64},
                img_size=16, report=False, progress=False, checkpoint_every=2, keep_checkpoints=3)  # fmt: skip
    return get_preset(DEFAULT_PRESET).replace(**{**base, **kw})


# ---- tiny in-memory data and models ---------------------------------------------------------------------------


def colour_data(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose class is their dominant colour (red, green, blue, grey) under noise: learnable fast."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 90, (n, size, size, 3))
    for i, c in enumerate(labels):
        if c < 3:
            images[i, :, :, c] += 120
        else:
            images[i] += 60
    return images.astype(np.uint8), labels.astype(np.int32)


class Batches(list):
    """A re-iterable list of batches; `delay` seconds per batch (to pace a run another process races)."""

    def __init__(self, items, delay: float = 0.0):
        super().__init__(items)
        self.delay = delay

    def __iter__(self):
        for item in super().__iter__():
            if self.delay:
                time.sleep(self.delay)
            yield item


def batches(images, labels, batch_size: int, delay: float = 0.0) -> Batches:
    return Batches([{"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}
                    for i in range(0, len(labels), batch_size)], delay)  # fmt: skip


def tiny_vit(seed: int = 0, **kw):
    import flaxvision

    return flaxvision.create_model("vit_tiny_patch16_224", num_classes=4, seed=seed, **{**TINY_VIT, **kw})


def flat_params(model) -> dict[str, np.ndarray]:
    """A model's parameters by dotted path, as numpy arrays."""
    from flax import nnx

    return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def trainer_vit(seed: int = 0, **kw):
    """The trainer tests' tiny ViT (TRAINER_VIT: two blocks)."""
    return tiny_vit(seed, **{**TRAINER_VIT, **kw})


def small_config(**kw):
    from flaxvision.train import TrainConfig

    base = dict(model="vit_tiny_patch16_224", epochs=2, batch_size=32, eval_batch_size=16, optimizer="adamw", lr=3e-3,
                log_every=2, progress=False, report=False, model_overrides=dict(TINY_VIT), checkpoint_every=2,
                keep_checkpoints=3, seed=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def colour_fit_kwargs(n_train: int = 128, delay: float = 0.0, overrides: dict | None = None) -> dict[str, Any]:
    """Everything but config/run_dir for a tiny fit on colour data (n_train / 32 steps per epoch)."""
    xt, yt = colour_data(n_train, 0)
    xv, yv = colour_data(32, 1)
    return dict(model=tiny_vit(**(overrides or {})), train_data=batches(xt, yt, 32, delay), val_data=batches(xv, yv, 16),
                class_names=CLASS_NAMES)  # fmt: skip


class StopAfter:
    """Wraps a flaxvision.data loader and raises KeyboardInterrupt (as Ctrl-C would) after `n` training batches."""

    def __init__(self, loader, n):
        self.loader, self.n, self.seen = loader, n, 0
        self.augment = loader.augment  # the colour jitter the device stage applies
        self.device_geometry = getattr(loader, "device_geometry", None)  # crops and flips, for an in-memory loader

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        wrapper = self

        class It:
            def __init__(self):
                self.it = iter(wrapper.loader)

            def __iter__(self):
                return self

            def __next__(self):
                if wrapper.seen == wrapper.n:
                    raise KeyboardInterrupt
                wrapper.seen += 1
                return next(self.it)

            def get_state(self):
                return self.it.get_state()

            def set_state(self, state):
                self.it.set_state(state)

        return It()


def straight_and_interrupted(tmp_path, config, make_model, make_loaders) -> tuple[Any, Any]:
    """(straight, resumed) FitResults of `config` on a tiny image folder (4 classes, 12 training images each: 6
    batches of 8 per epoch, 2 epochs): once without a stop, once interrupted in the middle of epoch 2 (as Ctrl-C
    would, after 10 batches: a checkpoint is saved) and resumed (the 11th read ends epoch 1). `make_loaders(model, splits) -> (train, val)`."""
    import pytest

    from flaxvision import data
    from flaxvision.data.synthetic import write_image_folder
    from flaxvision.train import TrainingInterrupted, fit

    root = write_image_folder(tmp_path / "images", num_classes=4, per_split={"train": 12, "validation": 3},
                              max_side=40, min_side=24)  # fmt: skip

    def run(run_dir, stop_after=None, resume=False):
        model = make_model()
        splits = data.load(str(root))
        train, val = make_loaders(model, splits)
        source = StopAfter(train, stop_after) if stop_after else train
        return fit(config, run_dir=run_dir, model=model, train_data=source, val_data=val,
                   class_names=list(splits.class_names), resume=resume)  # fmt: skip

    straight = run(tmp_path / "straight")
    # (the step it stops at depends on how far ahead the loop reads: batches, or groups of steps per call)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step (8|9|10); checkpoint saved"):
        run(tmp_path / "cut", stop_after=11)
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed.summary["steps"] == straight.summary["steps"] == 12
    return straight, resumed


def stop_after_first_epoch(*_args, **_kw):
    """An on_epoch_end callback that interrupts the run (as Ctrl-C would) once epoch 1 is checkpointed."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def short_failure(what: str):
    """An unexpected exception from deep inside the training stack fails the test on one line (no traceback:
    pytest's formatting of Orbax/asyncio tracebacks has hit a CPython 3.11 AST bug and aborted the session)."""
    import pytest

    try:
        yield
    except Exception as err:
        if isinstance(err, AssertionError):
            raise
        pytest.fail(f"{what}: {type(err).__name__}: {str(err)[:1500]}", pytrace=False)


def write_tar_shards(directory, images: np.ndarray, labels: np.ndarray, per_shard: int, *, split: str = "train",
                     ext: str = "png") -> list[Path]:  # fmt: skip
    """WebDataset shards as any wds writer makes them (tarfile, no flaxvision code): key.png + key.cls per sample,
    `per_shard` samples per file, named <split>-000000.tar, ...; the key of example i is its number."""
    import io
    import tarfile

    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, len(images), per_shard)):
        path = directory / f"{split}-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, len(images))):
                png = io.BytesIO()
                Image.fromarray(images[i]).save(png, format="PNG" if ext == "png" else "JPEG")
                for suffix, data in ((ext, png.getvalue()), ("cls", str(int(labels[i])).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


# ---- the Hugging Face Hub cache -------------------------------------------------------------------------------

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(cache, repo_id: str, checkpoint_dir) -> Path:
    """Put a checkpoint directory into huggingface_hub's cache layout (models--org--name/{refs/main,
    snapshots/<commit>/}), as a download would leave it; returns the snapshot directory."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    snapshot = repo / "snapshots" / HUB_COMMIT
    shutil.copytree(checkpoint_dir, snapshot)
    return snapshot


# ---- directories ---------------------------------------------------------------------------------------------


def snapshot(root: str | os.PathLike) -> dict[str, tuple]:
    """Every entry under `root` (itself included): relative name -> (kind, mode, mtime_ns, size, content).

    Directories are compared by name and mode, not mtime: a lock file created and removed again inside a run
    directory touches only the directory's mtime, and the contract is about files. A file left behind (a lock
    file that stays, a temporary) is a change.
    """
    root = Path(root)
    out: dict[str, tuple] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", st.st_mode, st.st_mtime_ns, os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", st.st_mode)
        else:
            out[rel] = ("file", st.st_mode, st.st_mtime_ns, st.st_size, path.read_bytes())
    return out


def snapshot_diff(before: dict, after: dict) -> list[str]:
    """Names that appeared, vanished or changed (content, mode or mtime) between two snapshots."""
    diff = [f"+{k}" for k in after.keys() - before.keys()] + [f"-{k}" for k in before.keys() - after.keys()]
    diff += [f"~{k}" for k in before.keys() & after.keys() if before[k] != after[k]]
    return sorted(diff)


def assert_unchanged(root, before: dict) -> None:
    diff = snapshot_diff(before, snapshot(root))
    assert not diff, f"{root} changed: {diff[:20]}"


def temp_leftovers(root) -> list[str]:
    """Files named like flaxvision.files' temporaries (.NAME.*.tmp) anywhere under root."""
    return [str(p) for p in Path(root).rglob(".*") if p.name.endswith(".tmp")]


def checkpoint_steps(run_dir) -> list[int]:
    d = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def truncate_array_data(checkpoint) -> list[Path]:
    """Cut every array data file of a checkpoint (the files under its `state/**/d/` folders) to half its size.

    Cutting only the largest file is not enough: with OCDBT a checkpoint holds data files that the restore never
    reads (the per-process files superseded by the merged ones), and a damaged unread file is no damage at all.
    """
    files = [p for p in (Path(checkpoint) / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {checkpoint}"
    for path in files:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    return files


def delete_metadata(directory) -> list[Path]:
    """Delete a checkpoint's metadata: both `_CHECKPOINT_METADATA` and `state/_METADATA` (where present)."""
    gone = []
    for name in ("_CHECKPOINT_METADATA", "state/_METADATA"):
        p = Path(directory) / name
        if p.exists():
            p.unlink()
            gone.append(p)
    assert gone, f"no metadata file found in {directory}: {sorted(os.listdir(directory))}"
    return gone


# ---- the command line ----------------------------------------------------------------------------------------


def flaxvision_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed `flaxvision` console script (or `python -m flaxvision.cli`) as a user runs it, on CPU."""
    exe = shutil.which("flaxvision", path=os.path.dirname(sys.executable)) or shutil.which("flaxvision")
    command = [exe, *args] if exe else [sys.executable, "-m", "flaxvision.cli", *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def cli_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "FLAXVISION_HUGE_PAGES": "0",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}  # fmt: skip
    # One CPU device in children (conftest gives this process 8 virtual ones): they compile and save faster.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env  # JAX's persistent compilation cache settings come from conftest, through os.environ


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_processes(reads: Path, args: Sequence[str], *, processes: int, devices: int,
                    delay: float = 0.0) -> list[subprocess.Popen]:  # fmt: skip
    """`flaxvision train ARGS` in `processes` processes of `devices` virtual CPU devices each, over a coordinator on
    a free local port (one process: no coordinator), each through tests/distributed_child.py (which records what it
    reads to READS.<pid>.jsonl; `delay` seconds per training batch) and in its own process group (a "host")."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "JAX_PLATFORMS": "cpu",
           "FLAXVISION_TEST_BATCH_DELAY": str(delay), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}  # fmt: skip
    command = [sys.executable, str(HERE / "distributed_child.py"), str(reads), "train", *map(str, args)]
    pipes: dict[str, Any] = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if processes == 1:
        return [subprocess.Popen(command, **pipes)]
    port = free_port()
    return [subprocess.Popen(command + ["--coordinator", f"localhost:{port}", "--num-processes", str(processes),
                                        "--process-id", str(i)], **pipes) for i in range(processes)]  # fmt: skip


# ---- speed: one persistent compilation cache for the session ---------------------------------------------------

def run_cli(args: Sequence[str | os.PathLike], capsys) -> tuple[int, str, str]:
    """`flaxvision ARGS` in this process: (exit code, stdout, stderr). argparse's SystemExit becomes its code."""
    from flaxvision.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 2)
    except Exception as err:  # the command let an exception out instead of a one-line error and an exit code
        import pytest

        out, errs = capsys.readouterr()
        pytest.fail(f"flaxvision {' '.join(map(str, args))[:300]} raised {type(err).__name__}: {str(err)[:1500]}",
                    pytrace=False)  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err


def cli_process(args: Sequence[str | os.PathLike], **popen) -> subprocess.Popen:
    """The `flaxvision` console script (flaxvision.cli:main) as a child process, in its own process group.

    Started as `python -c` over flaxvision.cli.main (what the console script runs), without the console script's
    install location mattering.
    """
    cmd = [sys.executable, "-c", "import sys; from flaxvision.cli import main; sys.exit(main())", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            cwd=popen.pop("cwd", None), start_new_session=True, **popen)  # fmt: skip


def communicate_or_kill(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str, str, float]:
    """(exit code or None when it ran past `timeout` and was killed, stdout, stderr, seconds)."""
    start = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    return code, out, err, time.monotonic() - start


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group, reap it and close its pipes."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def fit_process(spec: dict[str, Any], **popen) -> subprocess.Popen:
    """This file as a script: one tiny colour-data fit described by `spec` (see `_child`)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "fit", json.dumps(spec)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            start_new_session=True, **popen)  # fmt: skip


def last_json(out: str) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the child's output:\n{out[-3000:]}")


# A child run of 8 steps per epoch, 6 epochs (48 steps): the two-process and the disk-full tests share its programs.
SIX_EPOCHS: dict[str, Any] = {"n_train": 256, "config": {"epochs": 6}}


def _child(spec: dict[str, Any]) -> None:
    """spec: run_dir, config (TrainConfig fields over small_config), n_train, delay, resume, overwrite, overrides."""
    import flaxvision
    from flaxvision.train import fit

    overrides = spec.get("overrides")
    config = small_config(**({"model_overrides": {**TINY_VIT, **overrides}} if overrides else {}), **spec.get("config", {}))
    kwargs = colour_fit_kwargs(spec.get("n_train", 128), spec.get("delay", 0.0), spec.get("overrides"))
    try:
        result = fit(config, run_dir=spec["run_dir"], resume=spec.get("resume", False),
                     overwrite=spec.get("overwrite", False), **kwargs)  # fmt: skip
    except (flaxvision.FlaxvisionError, Exception) as err:
        print(json.dumps({"ok": False, "error": type(err).__name__, "flaxvision": isinstance(err, flaxvision.FlaxvisionError),
                          "message": str(err)}), flush=True)  # fmt: skip
        return
    print(json.dumps({"ok": True, "summary": result.summary}), flush=True)


# ---- a small file system -------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path, size: str):
    """Mount a tmpfs of `size` at `path` (skips the test when mounting is not permitted); always unmounted."""
    import pytest

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.25)


def remount_read_only(path) -> None:
    import pytest

    done = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot remount {path} read-only here: {done.stderr.strip() or done.returncode}")


# ---- the SIGKILL/resume test's child (tests/test_train.py) ---------------------------------------------------


def resume_fit_process(run_dir, steps: int, mode: str, delay: float = 0.0, recipe: dict | None = None,
                       **popen) -> subprocess.Popen:  # fmt: skip
    """This file as a script: `resume_fit` in a child process (mode "fresh" or "resume"); `recipe`: TrainConfig
    fields on top of the tiny recipe."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "resume-fit", str(run_dir), str(steps), mode, str(delay),
           json.dumps(recipe or {})]  # fmt: skip
    # The child imports this checkout's flaxvision (src/) and the tests package, as the test process does.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def kill_once_checkpointed(run_dir, steps: int, at_least: int, recipe: dict | None = None) -> int:
    """Start a paced `resume_fit` child (0.1 s per batch), SIGKILL it once it has checkpointed step `at_least`;
    return the newest step it left in checkpoints/."""
    child = resume_fit_process(run_dir, steps, "fresh", 0.1, recipe)
    checkpoints = Path(run_dir) / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        if checkpoints.exists() and max(checkpoint_steps(run_dir), default=-1) >= at_least:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not (Path(run_dir) / "summary.json").exists()
    return max(checkpoint_steps(run_dir))


def metrics_records(run_dir) -> list[dict[str, Any]]:
    """metrics.jsonl without the clocks and memory readings (which differ between any two runs)."""
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timing = ("images_per_second", "train_seconds", "input_wait_share", "peak_memory_bytes")
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


def resume_fit(run_dir: str, steps: int, resume: bool, delay: float, recipe: dict | None = None) -> None:
    """Train the trainer tests' tiny ViT for `steps` steps (8 per epoch), checkpointing every 2; print the summary
    as JSON."""
    from flaxvision.train import TrainConfig, fit

    xt, yt = colour_data(256, 0)
    xv, yv = colour_data(40, 1)
    config = TrainConfig(
        model="vit_tiny_patch16_224", epochs=steps // 8, batch_size=32, eval_batch_size=16, optimizer="adamw", lr=3e-3,
        warmup_steps=3, weight_decay=0.05, log_every=3, checkpoint_every=2, keep_checkpoints=3, progress=False,
        model_overrides=dict(TRAINER_VIT), seed=3, **(recipe or {}),
    )  # fmt: skip
    result = fit(
        config, run_dir=run_dir, model=trainer_vit(), train_data=batches(xt, yt, 32, delay), val_data=batches(xv, yv, 16),
        class_names=CLASS_NAMES, resume=resume,
    )  # fmt: skip
    print(json.dumps(result.summary))


def _main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "fit":
        _child(json.loads(argv[1]))
    elif len(argv) in (5, 6) and argv[0] == "resume-fit":
        resume_fit(argv[1], int(argv[2]), argv[3] == "resume", float(argv[4]), json.loads(argv[5]) if len(argv) == 6 else None)
    else:
        sys.exit(f"usage: python {sys.argv[0]} fit SPEC_JSON | resume-fit RUN_DIR STEPS fresh|resume DELAY [RECIPE_JSON]")


if __name__ == "__main__":
    _main(sys.argv[1:])
