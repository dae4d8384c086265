"""The run directory under damage, through `fit()`: unreadable checkpoints, a diverged run resumed with a lower
learning rate, a disk that fills up mid-run, and atomic writes that keep the old file when the disk is full.

A tiny ViT on colour data (4 steps per epoch, a checkpoint every 2 steps) keeps every run to a few seconds.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import flaxvision
from flaxvision.errors import TrainingDiverged, TrainingInterrupted
from flaxvision.train import fit
from tests.helpers import (
    CLASS_NAMES,
    SIX_EPOCHS,
    assert_unchanged,
    batches,
    checkpoint_steps,
    colour_data,
    colour_fit_kwargs,
    communicate_or_kill,
    delete_metadata,
    fit_process,
    last_json,
    short_failure,
    small_config,
    snapshot,
    stop_after_first_epoch,
    temp_leftovers,
    tiny_vit,
    tmpfs,
    truncate_array_data,
)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """2 epochs of 4 steps, interrupted after epoch 1: checkpoints 2 and 4, no summary."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(TrainingInterrupted):
        fit(small_config(), run_dir=run_dir, on_epoch_end=stop_after_first_epoch, **colour_fit_kwargs())
    assert checkpoint_steps(run_dir) == [2, 4] and not (run_dir / "summary.json").exists()
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run_dir, dest)
    return dest


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text.strip(), f"not one line: {text!r}"
    return text


# ---- I: the newest checkpoint unreadable ---------------------------------------------------------------------


@pytest.mark.parametrize("damage", [truncate_array_data, delete_metadata], ids=["truncated", "no_metadata"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(damage, stopped, tmp_path, capsys):
    run_dir = copy_of(stopped, tmp_path)
    damage(run_dir / "checkpoints" / "4")
    capsys.readouterr()
    with short_failure("resume with the newest checkpoint damaged"):
        result = fit(small_config(), run_dir=run_dir, resume=True, **colour_fit_kwargs())
    out = "".join(capsys.readouterr())
    assert "skipped checkpoint 4" in out, out[-2000:]
    skipped = next(line for line in out.splitlines() if "skipped checkpoint 4" in line)
    assert re.search(r"skipped checkpoint 4\W+\w+", skipped), f"no reason given: {skipped!r}"  # "...: <reason>"
    assert "resumed from step 2" in out, out[-2000:]
    assert result.summary["steps"] == 8
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_every_checkpoint_damaged_is_refused_and_nothing_changes(stopped, tmp_path, capsys):
    run_dir = copy_of(stopped, tmp_path)
    for step in checkpoint_steps(run_dir):
        truncate_array_data(run_dir / "checkpoints" / str(step))
    before = snapshot(run_dir)
    with short_failure("resume with every checkpoint damaged"), pytest.raises(flaxvision.FlaxvisionError) as info:
        fit(small_config(), run_dir=run_dir, resume=True, **colour_fit_kwargs())
    message = one_line(info.value)
    assert "no intact checkpoint" in message, message[:1000]
    assert_unchanged(run_dir, before)


# ---- J: a diverged run, resumed from its last good checkpoint with a lower learning rate ------------------------


class PoisonAt(list):
    """Float batches (unnormalised by the model: /255 here); the batch at global step `bad` (1-based) is all Inf."""

    def __init__(self, items, bad: int | None, per_epoch: int):
        super().__init__(items)
        self.bad, self.per_epoch, self.epoch = bad, per_epoch, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        for i, b in enumerate(super().__iter__()):
            image = b["image"].astype(np.float32) / 255.0
            if self.bad is not None and self.epoch * self.per_epoch + i + 1 == self.bad:
                image = np.full_like(image, np.inf)
            yield {"image": image, "label": b["label"]}


def test_diverged_run_names_a_good_checkpoint_and_resumes_from_it(tmp_path, capsys):
    xt, yt = colour_data(128, 0)
    xv, yv = colour_data(32, 1)
    val = PoisonAt(batches(xv, yv, 16), None, 2)
    # Checkpoints at 2, 4 (epoch end); Inf at step 5; a checkpoint would fall due at 6, the loss is read at 8:
    # the checkpoint of step 6 (after the bad step) is not a good one.
    config = small_config(epochs=2, checkpoint_every=2, log_every=4, keep_checkpoints=5)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        fit(config, run_dir=run_dir, model=tiny_vit(), train_data=PoisonAt(batches(xt, yt, 32), 5, 4), val_data=val,
            class_names=CLASS_NAMES)  # fmt: skip
    message = one_line(info.value)
    at_step = re.search(r"at step (\d+)", message)
    assert at_step, message
    bad = int(at_step.group(1))
    found = re.search(r"last good checkpoint: (\S*?/checkpoints/(\d+))\b", message, re.IGNORECASE)
    assert bad == 5 and found, message
    good = int(found.group(2))
    assert good < bad, message
    assert good == 4, message  # the last one written before the bad step (stricter than S < N)
    assert Path(found.group(1)).is_dir() and Path(found.group(1)).resolve() == (run_dir / "checkpoints" / "4").resolve()

    capsys.readouterr()
    with short_failure("resume with a lower lr"):
        result = fit(config.replace(lr=1e-4), run_dir=run_dir, resume=True, allow_changes=True, model=tiny_vit(),
                     train_data=PoisonAt(batches(xt, yt, 32), None, 4), val_data=val, class_names=CLASS_NAMES)  # fmt: skip
    out = capsys.readouterr().out
    assert f"resumed from step {good}" in out, out[-2000:]
    assert result.summary["steps"] == 8
    assert math.isfinite(result.summary["final_val_loss"])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in records if r["type"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train), train


# ---- K: the disk fills up during training ----------------------------------------------------------------------

def test_disk_full_during_training_is_one_line_and_the_last_checkpoint_restores(tmp_path):
    # The recipe of the two-process test (same compiled programs), a checkpoint every step (~0.3 MB each), all kept.
    spec = {**SIX_EPOCHS, "config": {**SIX_EPOCHS["config"], "checkpoint_every": 1, "keep_checkpoints": 100}}
    with tmpfs(tmp_path / "small", "1m") as mnt:
        run_dir = mnt / "run"
        # A child: a write that fails in an async checkpoint thread must not hang pytest.
        code, out, err, _ = communicate_or_kill(fit_process({**spec, "run_dir": str(run_dir)}), 240)
        assert code == 0, (code, err[-3000:])
        result = last_json(out)
        assert not result["ok"], "the run fitted in 1 MB: make the checkpoints bigger"
        assert result["flaxvision"], result  # a FlaxvisionError (exit 2 on the command line), not an OSError
        message = result["message"]
        assert "\n" not in message.strip(), message
        assert str(mnt) in message and "free" in message, message
        steps = checkpoint_steps(run_dir)
        assert steps, "no complete checkpoint was left"
        roomy = tmp_path / "roomy"
        shutil.copytree(run_dir, roomy)
    code, out, err, _ = communicate_or_kill(fit_process({**spec, "run_dir": str(roomy), "resume": True}), 240)
    assert code == 0, (code, err[-3000:])
    assert f"resumed from step {max(steps)}" in out, out[-2000:]
    result = last_json(out)
    assert result["ok"] and result["summary"]["steps"] == 48, result


# ---- M: atomic writes ----------------------------------------------------------------------------------------


def test_write_atomic_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    from flaxvision.files import StorageError, write_atomic

    path = tmp_path / "summary.json"
    path.write_text("old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StorageError) as info:
        write_atomic(path, "new")
    monkeypatch.undo()
    assert isinstance(info.value, flaxvision.FlaxvisionError)
    assert "disk is full" in one_line(info.value) and str(path) in str(info.value)
    assert path.read_text() == "old"
    assert temp_leftovers(tmp_path) == []


def test_a_new_file_gets_ordinary_permissions(tmp_path):
    from flaxvision.files import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert temp_leftovers(tmp_path) == []


def test_a_malformed_run_config_is_one_clear_error(tmp_path):
    """One reader of a run's recipe (TrainConfig.from_file, over files.read_json): every way it is broken is one line."""
    from flaxvision.train import TrainConfig

    path = tmp_path / "config.json"
    path.write_text('{"train_config": {"lr": 0.01, "epochs": 2}}')
    assert (TrainConfig.from_file(path).lr, TrainConfig.from_file(path).epochs) == (0.01, 2)
    for text, message in (("{not json", "cannot read"), ("[1, 2]", "not a JSON object"),
                          ('{"train_config": 3}', "train_config is not a JSON object"),
                          ('{"train_config": {"learning_rate": 1}}', "unknown training option 'learning_rate'")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(flaxvision.FlaxvisionError, match=message):
            TrainConfig.from_file(path)
    with pytest.raises(flaxvision.FlaxvisionError, match="no such file"):
        TrainConfig.from_file(tmp_path / "missing.json")
