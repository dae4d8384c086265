"""The run directory through `flaxvision train/report/export`, as a user meets it: finished, stopped, refused,
shared by two processes, read-only; plus the messages a new user gets for bad options and runs too big to fit.

Two runs are trained once per module (in this process, tiny digits recipe, 4 steps per epoch) and copied per test:
`stopped` (lr 0.004, 2 epochs, interrupted after epoch 1: checkpoints 2 and 4, no summary) and `finished` (the
same run resumed to its end). Every refusal is checked to leave the directory exactly as it was (names, bytes,
modes, mtimes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

import flaxvision
from flaxvision.errors import TrainingInterrupted
from flaxvision.train import fit
from tests.helpers import (
    SIX_EPOCHS,
    TINY_CLI,
    assert_unchanged,
    checkpoint_steps,
    cli_process,
    communicate_or_kill,
    error_lines,
    fit_process,
    kill_group,
    last_json,
    remount_read_only,
    run_cli,
    snapshot,
    stop_after_first_epoch,
    temp_leftovers,
    tiny_cli_config,
    tmpfs,
)

RECIPE = [*TINY_CLI, "--lr", "0.004", "--epochs", "2"]  # the stopped run's recipe, as options


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    old = os.umask(0o022)
    try:
        with pytest.raises(TrainingInterrupted):
            fit(tiny_cli_config(lr=0.004, epochs=2), run_dir=run_dir, on_epoch_end=stop_after_first_epoch)
    finally:
        os.umask(old)
    assert checkpoint_steps(run_dir) == [2, 4] and not (run_dir / "summary.json").exists()
    return run_dir


@pytest.fixture(scope="module")
def finished(stopped, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    shutil.copytree(stopped, run_dir)
    old = os.umask(0o022)
    try:
        fit(tiny_cli_config(lr=0.004, epochs=2), run_dir=run_dir, resume=True)
    finally:
        os.umask(old)
    assert (run_dir / "summary.json").exists() and (run_dir / "eval.json").exists()
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    dest = tmp_path / name
    shutil.copytree(run_dir, dest)  # copy2: contents, modes and mtimes as they were
    return dest


def refused(code: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one line on stderr, containing every needle (regular expressions); returns the line."""
    lines = error_lines(err)
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err[-2000:]}"
    for needle in needles:
        assert re.search(needle, lines[0]), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---- A, B, C: what --resume and a plain train do with a directory in each state --------------------------------


def test_resume_of_a_finished_run_is_a_no_op(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run_cli(["train", "--run-dir", run_dir, "--resume"], capsys)
    assert code == 0, err[-2000:]
    assert "already finished" in out + err
    assert_unchanged(run_dir, before)  # summary.json, eval.json, model/* and everything else: bytes and mtimes


@pytest.mark.parametrize("state", ["empty", "config_only"])
def test_resume_without_a_checkpoint_is_refused(state, stopped, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if state == "config_only":
        shutil.copy2(stopped / "config.json", run_dir / "config.json")
    before = snapshot(run_dir)
    # The recipe options equal config.json's (no change to refuse): the only thing wrong is the missing checkpoint.
    code, out, err = run_cli(["train", "--run-dir", run_dir, "--resume", *RECIPE], capsys)
    refused(code, err, "no checkpoint")
    assert_unchanged(run_dir, before)


@pytest.mark.parametrize("which", ["finished", "stopped"])
def test_train_into_a_run_directory_needs_resume_or_overwrite(which, request, tmp_path, capsys):
    run_dir = copy_of(request.getfixturevalue(which), tmp_path)
    before = snapshot(run_dir)
    code, out, err = run_cli(["train", "--run-dir", run_dir, *RECIPE], capsys)
    refused(code, err, "--resume", "--overwrite")
    assert_unchanged(run_dir, before)


# ---- D, E: --resume continues the saved recipe; a changed field needs --allow-changes -------------------------


def test_resume_uses_the_recipe_saved_in_config_json(stopped, tmp_path, capsys):
    run_dir = copy_of(stopped, tmp_path)
    code, out, err = run_cli(["train", "--run-dir", run_dir, "--resume"], capsys)  # no recipe options at all
    assert code == 0, err[-2000:]
    assert "resumed from step 4" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 8
    record = json.loads((run_dir / "config.json").read_text())
    assert record["train_config"]["lr"] == 0.004 and record["train_config"]["epochs"] == 2
    assert record["train_config"]["model_overrides"]["width"] == 32  # the stopped run's model, not the preset's


@pytest.fixture
def other_dataset(tmp_path) -> str:
    from flaxvision.data.synthetic import write_image_folder

    return str(write_image_folder(tmp_path / "other", num_classes=10, per_split={"train": 4, "validation": 2},
                                  max_side=24, min_side=16))  # fmt: skip


CHANGES = {
    "lr": (["--lr", "0.01"], [r"\blr\b", r"0\.004", r"0\.01\b"]),
    "epochs": (["--epochs", "3"], [r"\bepochs\b", r"\b2\b", r"\b3\b"]),
    "batch_size": (["--batch-size", "16"], [r"batch[_-]size", r"\b32\b", r"\b16\b"]),
    "model": (["--model", "vit_small_patch16_224"], [r"\bmodel\b", "vit_tiny_patch16_224", "vit_small_patch16_224"]),
    "dataset": (["--dataset", "OTHER"], [r"\bdataset\b", "builtin:digits", "OTHER"]),
}


@pytest.mark.parametrize("field", list(CHANGES))
def test_resume_refuses_a_changed_recipe_field(field, stopped, tmp_path, capsys, request):
    options, needles = CHANGES[field]
    if field == "dataset":
        other = request.getfixturevalue("other_dataset")
        options, needles = [other if o == "OTHER" else o for o in options], [re.escape(other) if n == "OTHER" else n for n in needles]
    run_dir = copy_of(stopped, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run_cli(["train", "--run-dir", run_dir, "--resume", *options], capsys)
    # A new model cannot continue the checkpoints at all: no --allow-changes offered, a new run suggested instead.
    refused(code, err, *needles, "cannot change.*new run" if field == "model" else "--allow-changes")
    assert_unchanged(run_dir, before)


def test_allow_changes_resumes_and_records_the_change(stopped, tmp_path, capsys):
    run_dir = copy_of(stopped, tmp_path)
    code, out, err = run_cli(["train", "--run-dir", run_dir, "--resume", "--lr", "0.01", "--allow-changes"], capsys)
    assert code == 0, err[-2000:]
    assert "resumed from step 4" in out
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    record = json.loads((run_dir / "config.json").read_text())
    # Stricter reading: "step" is the step the run resumed from (4), and an entry holds exactly step + changes.
    assert record["resume_changes"] == [{"step": 4, "changes": {"lr": [0.004, 0.01]}}]


# ---- F, G: flags that contradict, and --overwrite that validates before it deletes -----------------------------


def test_resume_and_overwrite_together_are_refused(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run_cli(["train", "--run-dir", run_dir, "--resume", "--overwrite", *RECIPE], capsys)
    refused(code, err, "--resume", "--overwrite")
    assert_unchanged(run_dir, before)


@pytest.mark.parametrize("bad", [["--dataset", "/nonexistent/path"], ["--model", "no_such_model"]], ids=["dataset", "model"])
def test_overwrite_validates_before_deleting(bad, finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run_cli(["train", "--run-dir", run_dir, "--overwrite", *RECIPE, *bad], capsys)
    refused(code, err, re.escape(bad[1]))
    assert_unchanged(run_dir, before)


# ---- H: one run directory, two processes --------------------------------------------------------------------------


def test_a_second_process_is_refused_while_the_first_trains_and_takes_over_after_it_dies(tmp_path):
    run_dir = tmp_path / "run"
    # 8 steps per epoch, 6 epochs, 1 s per batch: the first run trains for about 45 s after its first checkpoint
    # (it is killed as soon as the second processes have answered).
    spec = {**SIX_EPOCHS, "run_dir": str(run_dir)}
    first = fit_process({**spec, "delay": 1.0})
    try:
        deadline = time.monotonic() + 180
        while not checkpoint_steps(run_dir) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert checkpoint_steps(run_dir), f"the first run never checkpointed (exit {first.poll()})"
        # Both at once (each pays a Python + JAX start-up on a loaded machine).
        second = [cli_process(["train", "--run-dir", run_dir, "--resume"]),
                  cli_process(["train", "--run-dir", run_dir, "--overwrite"])]  # fmt: skip
        results = [communicate_or_kill(p, 60) for p in second]
        first_alive = first.poll() is None
        for code, _out, err, _took in results:
            line = refused(code if code is not None else -1, err, "in use", rf"\b{first.pid}\b", re.escape(socket.gethostname()))
            assert "Traceback" not in err, line
        # "Within a few seconds": start-up included, on 2 shared cores; nothing needs loading or compiling.
        assert max(r[3] for r in results) < 30, [r[3] for r in results]
        assert first_alive, "the first run ended before the second was refused: pace it slower"
        assert checkpoint_steps(run_dir), "the refused --overwrite deleted the run's checkpoints"
    finally:
        kill_group(first)
    third = fit_process({**spec, "resume": True})
    code, out, err, _ = communicate_or_kill(third, 300)
    assert code == 0, err[-3000:]
    result = last_json(out)
    assert result["ok"], result
    assert result["summary"]["steps"] == 48


# ---- K (read-only), L, M: report, export, file modes ------------------------------------------------------------


def test_report_into_a_read_only_run_directory_is_one_line(finished, tmp_path, capsys):
    with tmpfs(tmp_path / "mnt", "64m") as mnt:
        run_dir = copy_of(finished, mnt)
        remount_read_only(mnt)
        code, out, err = run_cli(["report", run_dir], capsys)
        refused(code, err, re.escape(str(run_dir)))


def test_export_refuses_a_non_empty_out(finished, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    before = snapshot(out_dir)
    code, out, err = run_cli(["export", finished, "--format", "flaxvision", "--out", out_dir], capsys)
    refused(code, err, re.escape(str(out_dir)))
    assert_unchanged(out_dir, before)


def test_export_refuses_out_equal_to_the_run_directory(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run_cli(["export", run_dir, "--format", "flaxvision", "--out", run_dir], capsys)
    refused(code, err)
    assert_unchanged(run_dir, before)


def test_export_overwrite_replaces_out(finished, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, out, err = run_cli(["export", finished, "--format", "flaxvision", "--out", out_dir, "--overwrite"], capsys)
    assert code == 0, err[-2000:]
    assert not (out_dir / "keep.txt").exists()
    assert flaxvision.load_pretrained(str(out_dir)).config.num_classes == 10


def test_export_overwrite_onto_the_run_directory_itself(finished, tmp_path, capsys):
    # Taken literally ("OUT replaced by the export"): the run directory becomes the exported model directory.
    run_dir = copy_of(finished, tmp_path)
    code, out, err = run_cli(["export", run_dir, "--format", "flaxvision", "--out", run_dir, "--overwrite"], capsys)
    assert code == 0, err[-2000:]
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists()
    assert flaxvision.load_pretrained(str(run_dir)).config.num_classes == 10


def test_run_files_have_ordinary_permissions_and_no_temporaries(finished, stopped):
    files = [finished / n for n in ("config.json", "summary.json", "eval.json", "metrics.jsonl")]
    files += [p for p in (finished / "model").rglob("*") if p.is_file()]
    assert len(files) > 4
    modes = {str(p.relative_to(finished)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    assert temp_leftovers(finished) == [] and temp_leftovers(stopped) == []


# ---- N: a new user's mistakes ----------------------------------------------------------------------------------


def test_nan_learning_rate_is_refused_naming_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["train", "--run-dir", run_dir, *TINY_CLI, "--epochs", "1", "--lr", "nan"], capsys)
    refused(code, err, r"\blr\b|--lr")


def test_a_bad_option_value_is_short(capsys):
    code, out, err = run_cli(["train", "--epochs", "two"], capsys)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) <= 2, err  # not the whole usage
    assert "--epochs" in err and "see --help" in err


def _out_of_memory_error():
    import importlib

    for name in ("flaxvision.train", "flaxvision.train.loop", "flaxvision.train.memory", "flaxvision.train.trainer"):
        try:
            found = getattr(importlib.import_module(name), "out_of_memory_error", None)
        except ImportError:
            continue
        if found is not None:
            return found
    pytest.fail("flaxvision.train.out_of_memory_error is gone")


def test_out_of_memory_message_names_only_real_options(capsys):
    config = tiny_cli_config(batch_size=64)
    err = _out_of_memory_error()(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.2GiB"), config)
    assert isinstance(err, flaxvision.FlaxvisionError)
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", str(err)))
    assert flags, str(err)
    code, help_text, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    real = set(re.findall(r"--[a-z][a-z0-9-]*", help_text))
    assert flags <= real, f"{sorted(flags - real)} named by {str(err)!r} are not options of `flaxvision train`"


TOO_BIG = ["--model", "vit_tiny_patch16_224", "--img-size", "224", "--batch-size", "32", "--no-progress", "--no-report",
           "--epochs", "1", "--max-train-samples", "64", "--max-val-samples", "32"]  # fmt: skip


def _memory_capped() -> dict:
    """Keep a child that really tries the huge run from taking this machine down with it (address space cap)."""
    import resource

    def cap():
        limit = 16 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return {"preexec_fn": cap}


def test_preset_model_overrides_dropped_for_another_image_size(tmp_path):
    """The default preset (patch 4, width 128) at --img-size 224 is 3137 tokens: the user must hear that the preset's
    model_overrides were dropped (and then either a clean exit 2 or a run that fits and goes on)."""
    proc = cli_process(["train", "--run-dir", tmp_path / "run", *TOO_BIG], **_memory_capped())
    code, out, err, took = communicate_or_kill(proc, 20)
    said = re.search(r"model_overrides.*dropped|dropped.*model_overrides", out + err)
    if code == 2:
        assert took < 20 and said, err[-2000:]
    else:
        # Stricter reading: a run that goes on must also have said that the overrides were dropped.
        assert code in (0, None) and said, (code, out[-2000:], err[-2000:])
        assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err


def test_a_run_too_big_for_memory_fails_fast_with_an_estimate(tmp_path):
    proc = cli_process(["train", "--run-dir", tmp_path / "run", *TOO_BIG, "--model-overrides", '{"patch_size": 4}'],
                       **_memory_capped())  # fmt: skip
    code, out, err, took = communicate_or_kill(proc, 20)
    assert code == 2 and took < 20, (code, took, err[-2000:])
    line = error_lines(err)[-1]
    assert line.startswith("flaxvision: error:"), err[-2000:]
    assert re.search(r"\d(\.\d+)? ?GB", line) and "--batch-size" in line, line
