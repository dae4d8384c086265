"""Multi-process training for real: `flaxvision train` in 2 processes x 2 virtual CPU devices over localhost.

Each process is a separate Python (its own JAX, jax.distributed with a coordinator on a free local port, gloo CPU
collectives), run through the CLI as users run it (tests/distributed_child.py only records the examples each
process reads). The reference is the same recipe in 1 process x 4 devices: the same global mesh size and batch.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from flax import nnx

import flaxvision
from flaxvision.data.synthetic import write_image_folder
from flaxvision.models.cnn import CNN
from tests.helpers import train_processes

STEPS = 12  # 3 epochs of 4 global batches of 16 (64 training images); a checkpoint every 2 steps
RECIPE = ["--model", "cnn", "--model-overrides", "{}", "--img-size", "16", "--epochs", "3", "--batch-size", "16",
          "--eval-batch-size", "8", "--optimizer", "sgd", "--lr", "0.05", "--log-every", "2", "--checkpoint-every", "2",
          "--keep-checkpoints", "10", "--no-progress", "--no-report", "--seed", "1", "--heartbeat-timeout", "10"]  # fmt: skip


def start(dataset: Path, run_dir: Path, reads: Path, *, processes: int, devices: int, delay: float = 0.0,
          extra: tuple = ()) -> list[subprocess.Popen]:  # fmt: skip
    return train_processes(reads, ["--dataset", str(dataset), "--run-dir", str(run_dir), *RECIPE, *extra],
                           processes=processes, devices=devices, delay=delay)  # fmt: skip


def finish(children: list[subprocess.Popen], timeout: float = 240) -> list[tuple[str, str]]:
    outputs = []
    for child in children:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for c in children:
                c.kill()
            raise
        assert child.returncode == 0, err[-3000:]
        outputs.append((out, err))
    return outputs


def final_params(run_dir: Path) -> dict[str, np.ndarray]:
    model = flaxvision.load_pretrained(str(run_dir / "model"))
    return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def reads_by_process(reads: Path) -> dict[tuple[int, int], dict[int, list[int]]]:
    """(shard index, count) -> {batch number: source positions read}, checking that every process (file) read
    batches of one shard only."""
    out: dict = {}
    for path in reads.parent.glob(reads.name + ".*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        shards = {tuple(r["shard"]) for r in records}
        assert len(shards) == 1, f"one process read batches of several shards: {shards}"
        out[shards.pop()] = {r["g"]: r["positions"] for r in records}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The dataset (64 train, 20 val images of 4 classes) and the 1 process x 4 devices run of the recipe."""
    root = tmp_path_factory.mktemp("multiprocess")
    dataset = write_image_folder(root / "data", num_classes=4, per_split={"train": 16, "validation": 5},
                                 max_side=24, min_side=20)  # fmt: skip
    run_dir = root / "one"
    finish(start(dataset, run_dir, root / "reads-one", processes=1, devices=4))
    return dataset, run_dir, root / "reads-one"


def test_two_processes_reach_the_parameters_of_one_reading_only_their_slices(reference, tmp_path):
    dataset, one, one_reads = reference
    two = tmp_path / "two"
    outputs = finish(start(dataset, two, tmp_path / "reads", processes=2, devices=2))
    assert "on 2 processes, 4 devices" in outputs[0][0] and "flaxvision" not in outputs[1][0]  # process 0 reports

    a, b = final_params(one), final_params(two)
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, rtol=0, err_msg=key)
    untrained = cast(CNN, flaxvision.create_model("cnn", num_classes=4, img_size=16, in_chans=3, seed=1))
    assert not np.allclose(a["fc1.kernel"], untrained.fc1.kernel[...])  # it trained

    # Each process read only its half of every global batch: the half that 1 process reads at the same rows.
    whole = reads_by_process(one_reads)[(0, 1)]
    halves = reads_by_process(tmp_path / "reads")
    assert set(halves) == {(0, 2), (1, 2)}
    for (index, _), batches in halves.items():
        assert set(range(STEPS)) <= set(batches)
        for g, positions in batches.items():
            assert positions == whole[g][8 * index : 8 * index + 8], (index, g)
    for g in range(STEPS):
        assert not set(halves[(0, 2)][g]) & set(halves[(1, 2)][g])

    # Evaluation covers the 20 validation images exactly once across processes (2 full global batches of 8 and a
    # remainder of 4), with the result of the single process.
    evals = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [r["val_count"] for r in evals] == [20, 20, 20]
    ev_one, ev_two = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert ev_two["confusion"] == ev_one["confusion"] and np.sum(ev_two["confusion"]) == 20
    assert abs(ev_two["val_loss"] - ev_one["val_loss"]) < 1e-5
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == sorted(
        str(s) for s in range(2, STEPS + 1, 2))


def test_a_killed_process_stops_the_other_clearly_and_the_run_resumes_in_one_process(reference, tmp_path):
    dataset, one, _ = reference
    run_dir = tmp_path / "run"
    p0, p1 = start(dataset, run_dir, tmp_path / "reads", processes=2, devices=2, delay=0.5)
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + 180
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert p0.poll() is None and p1.poll() is None, "a process ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.1)
    os.killpg(p1.pid, signal.SIGKILL)  # the whole "host" of process 1 dies mid-run
    killed = time.monotonic()
    p1.communicate()
    try:
        out, err = p0.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(p0.pid, signal.SIGKILL)
        pytest.fail("process 0 still runs 90 s after process 1 died (hang)")
    stopped_after = time.monotonic() - killed
    assert p0.returncode == 1, err[-3000:]
    assert stopped_after < 60  # the heartbeat timeout is 10 s
    lines = [line for line in err.splitlines() if line.startswith("flaxvision: error:")]
    assert len(lines) == 1 and "another process died or became unreachable" in lines[0], err[-3000:]
    assert f"--run-dir {run_dir} --resume" in lines[-1]
    saved = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert 2 <= saved < STEPS

    # The checkpoint written by 2 processes resumes in 1 process x 4 devices and ends where the uninterrupted
    # run ends.
    [(out, err)] = finish(start(dataset, run_dir, tmp_path / "reads-resumed", processes=1, devices=4, extra=("--resume",)))
    assert f"resumed from step {saved}" in out and "saved by 2 processes" in out
    a, b = final_params(one), final_params(run_dir)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, rtol=0, err_msg=key)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["devices"] == 4
