"""Sharded data across real processes: `flaxvision train` from WebDataset tar shards in 4 processes x 2 virtual
CPU devices over localhost, and a 2-process run killed and resumed (tests/distributed_child.py records what each
process reads)."""

import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import colour_data, train_processes, write_tar_shards

PER_EPOCH = 4  # 64 training images / global batch 16
RECIPE = ["--model", "cnn", "--img-size", "16", "--epochs", "1", "--batch-size", "16", "--eval-batch-size", "8",
          "--optimizer", "sgd", "--lr", "0.05", "--log-every", "2", "--checkpoint-every", "2", "--keep-checkpoints", "10",
          "--shuffle-buffer", "8", "--no-progress", "--no-report", "--seed", "3", "--heartbeat-timeout", "10"]  # fmt: skip


def _start(dataset: Path, run_dir: Path, reads: Path, processes: int, devices: int, *, delay: float = 0.0,
           extra: tuple = ()) -> list[subprocess.Popen]:  # fmt: skip
    return train_processes(reads, ["--dataset", str(dataset), "--run-dir", str(run_dir), *RECIPE, *extra],
                           processes=processes, devices=devices, delay=delay)  # fmt: skip


def _finish(children: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for every process; their stdouts."""
    outs = []
    for child in children:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for c in children:
                os.killpg(c.pid, signal.SIGKILL)
            raise
        assert child.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _reads(reads: Path) -> dict[int, dict[int, list[int]]]:
    """process index -> {global batch number: source positions it read}."""
    out: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for path in reads.parent.glob(reads.name + ".*.jsonl"):
        for record in map(json.loads, path.read_text().splitlines()):
            out[record["shard"][0]][record["g"]] = record["positions"]
    return out


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    from flax import nnx

    import flaxvision

    model = flaxvision.load_pretrained(str(run_dir / "model"))
    return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def tar_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    x, y = colour_data(64, 11)
    write_tar_shards(root / "data", x, y, per_shard=8)  # 8 training shards
    xv, yv = colour_data(20, 12)
    write_tar_shards(root / "data", xv, yv, per_shard=8, split="val")  # 3 validation shards
    return root / "data"


def test_four_processes_read_every_example_once_per_epoch_from_their_own_shards(tar_dataset, tmp_path):
    from flaxvision import data

    run_dir = tmp_path / "four"
    _finish(_start(tar_dataset, run_dir, tmp_path / "reads", processes=4, devices=2))
    source = data.load(str(tar_dataset)).train
    reads = _reads(tmp_path / "reads")
    assert sorted(reads) == [0, 1, 2, 3]
    # (that the shard order and the buffer change with the epoch is tests/test_data_shards.py's)
    per_process = {p: [i for g in range(PER_EPOCH) for i in reads[p][g]] for p in reads}
    everything = sorted(i for positions in per_process.values() for i in positions)
    assert everything == list(range(64))  # each example exactly once in the epoch, between the four
    for p, positions in per_process.items():  # 16 examples = 2 of the 8 shards each (their own)
        assert len(np.unique(source.images.shard_of(source.ids[positions]))) == 2, p
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == PER_EPOCH and summary["devices"] == 8
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [r["val_count"] for r in evals] == [20]  # validation: every image once across the processes


def test_a_killed_two_process_run_resumes_on_two_processes_to_the_uninterrupted_parameters(tar_dataset, tmp_path):
    straight = tmp_path / "straight"
    _finish(_start(tar_dataset, straight, tmp_path / "reads-straight", processes=2, devices=2))
    run_dir = tmp_path / "killed"
    children = _start(tar_dataset, run_dir, tmp_path / "reads-killed", processes=2, devices=2, delay=1.0)
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(p.name.isdigit() and int(p.name) >= 2 for p in checkpoints.iterdir())):
        assert all(c.poll() is None for c in children), "a process ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.1)
    time.sleep(0.3)  # into the next batch, past the checkpoint
    for child in children:  # both hosts die
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
    assert not (run_dir / "summary.json").exists()
    saved = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert 2 <= saved < PER_EPOCH
    out = _finish(_start(tar_dataset, run_dir, tmp_path / "reads-resumed", processes=2, devices=2, extra=("--resume",)))[0]
    assert f"resumed from step {saved}" in out
    a, b = _params(straight), _params(run_dir)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-6, rtol=0, err_msg=key)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == PER_EPOCH
