"""Scale-out pieces that run in one process: FSDP sharding, per-process data slices, launch settings, resume maps.

The multi-process runs themselves (2 processes over localhost) are in test_distributed_multiprocess.py.
"""

from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

import flaxvision
from flaxvision import distributed
from flaxvision.cli import main
from flaxvision.data import load, make_loader
from flaxvision.data.synthetic import write_image_folder
from flaxvision.errors import ConfigError
from flaxvision.preprocessing import Preprocessing
from flaxvision.train import TrainConfig, Trainer
from flaxvision.train.checkpoint import Progress
from flaxvision.train.loop import _data_state_for_this_process
from tests.helpers import colour_data


def small_config(**kw) -> TrainConfig:
    base = dict(model="cnn", img_size=16, epochs=1, batch_size=16, optimizer="sgd", lr=0.05, log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def small_cnn():
    return flaxvision.create_model("cnn", num_classes=4, img_size=16, in_chans=3, seed=0)


def resolved(**kw) -> distributed.Launch:
    """`distributed.resolve(**kw)`, which must find a multi-process launch."""
    launch = distributed.resolve(**kw)
    assert launch is not None, f"no launch resolved from {kw}"
    return launch


def spec_of(x) -> tuple:
    return tuple(x.sharding.spec)


def test_fsdp_matches_replicated_and_really_shards(cpu_devices):
    xt, yt = colour_data(64, 0)
    runs = {}
    for mode in ("replicated", "fsdp"):
        trainer = Trainer(small_config(param_sharding=mode, fsdp_min_size=1024), small_cnn(), steps_per_epoch=4,
                          devices=cpu_devices)  # fmt: skip
        losses = []
        for i in range(4):
            b = {"image": xt[16 * i : 16 * i + 16], "label": yt[16 * i : 16 * i + 16]}
            trainer.state = trainer.train_step(trainer.state, trainer.stage.put(b))
            losses.append(trainer.read_train_metrics()["loss"])
        runs[mode] = (losses, trainer)
    np.testing.assert_allclose(runs["replicated"][0], runs["fsdp"][0], atol=1e-5, rtol=0)

    state = runs["fsdp"][1].state
    fc1 = state.params["fc1"]["kernel"][...]  # (1024, 256) >= 1024 elements
    assert fc1.shape == (1024, 256) and spec_of(fc1) == ("data", None)  # the largest dimension that divides by 8
    assert {s.data.shape for s in fc1.addressable_shards} == {(128, 256)}  # each device holds an eighth
    conv2 = state.params["conv2"]["kernel"][...]  # (3, 3, 32, 64): output channels
    assert spec_of(conv2) == (None, None, None, "data")
    assert state.params["fc1"]["bias"][...].sharding.is_fully_replicated  # 256 elements: replicated
    # The momentum is laid out like their parameters; nothing big is left replicated.
    for leaf in jax.tree.leaves(state.opt_state):
        if leaf.size >= 1024:
            assert "data" in spec_of(leaf), leaf.shape
    sharded = [x.shape for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
    assert sorted(sharded) == [(3, 3, 32, 64), (256, 4), (1024, 256)]
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(runs["replicated"][1].state))
    # The final model is gathered from the shards: the same weights as the replicated run.
    a, b = (jax.tree.leaves(nnx.state(runs[m][1].current_model(), nnx.Param)) for m in ("replicated", "fsdp"))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def test_fsdp_spec_is_chosen_by_size_and_divisibility_only():
    spec = lambda shape, n=8, m=1000: tuple(distributed.fsdp_spec(shape, n, m))  # noqa: E731
    assert spec((768, 3072)) == (None, "data")
    assert spec((12, 768, 3072)) == (None, None, "data")  # a stacked layer axis is never assumed
    assert spec((3072, 12)) == ("data", None)
    assert spec((100, 30)) == ()  # nothing divides by 8: replicated
    assert spec((30, 30), m=1000) == ()  # small: replicated
    assert spec((30, 40), n=1) == ()  # one device: nothing to shard
    assert spec((12, 1000), n=12) == (None, "data") or spec((12, 1000), n=12) == ("data", None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_image_folder(root, num_classes=3, per_split={"train": 9, "validation": 3}, max_side=32, min_side=24)
    return load(str(root))


def test_process_slices_concatenate_to_the_one_process_global_batch(data):
    pre = Preprocessing(img_size=16)
    common: dict[str, Any] = dict(preprocessing=pre, train=True, seed=5)
    whole = make_loader(data.train, batch_size=8, **common)
    parts = [make_loader(data.train, batch_size=4, shard_index=i, shard_count=2, **common) for i in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 3  # 27 examples: 3 global batches of 8
    for epoch in (0, 1):
        for loader in (whole, *parts):
            loader.set_epoch(epoch)
        for w, p0, p1 in zip(whole, *parts):
            for key in ("id", "label", "image"):  # the same examples, augmented identically
                np.testing.assert_array_equal(w[key], np.concatenate([p0[key], p1[key]]))
            assert not set(p0["id"].tolist()) & set(p1["id"].tolist())
    # Eval: every example exactly once across processes, the remainder padded with masked rows.
    evals = [make_loader(data.val, batch_size=2, train=False, shard_index=i, shard_count=2, preprocessing=pre) for i in range(2)]  # fmt: skip
    seen = [i for loader in evals for b in loader for i, m in zip(b["id"], b["mask"]) if m]
    assert sorted(seen) == sorted(data.val.ids.tolist()) and len(evals[0]) == len(evals[1]) == 3


def test_data_states_map_to_another_process_count(monkeypatch):
    states = [{"epoch": 1, "batch": 2, "skipped": {"0": [5]}}, {"epoch": 1, "batch": 2, "skipped": {"0": [7]}}]
    meta = {"data_states": states, "data_state": states[0]}
    mine = _data_state_for_this_process(Progress.from_json(meta))  # saved by 2 processes, restored by 1
    assert (mine["epoch"], mine["batch"]) == (1, 2) and sorted(mine["skipped"]["0"]) == [5, 7]
    assert _data_state_for_this_process(Progress(data_state={"epoch": 0, "batch": 1})) == {"epoch": 0, "batch": 1}


def test_launch_settings_from_flags_environment_and_cluster():
    launch = distributed.resolve("host0:1234", 2, 1, heartbeat_timeout=5)
    assert launch is not None
    assert (launch.coordinator, launch.num_processes, launch.process_id, launch.heartbeat_timeout) == ("host0:1234", 2, 1, 5)
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolved(environ=env).process_id == 3
    assert distributed.resolve(environ={}) is None
    assert distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert resolved(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}).cluster == "SLURM"
    assert resolved(environ={"TPU_WORKER_HOSTNAMES": "a,b"}).cluster == "Cloud TPU pod"
    with pytest.raises(ConfigError, match="missing --num-processes, --process-id"):
        distributed.resolve("host0:1234", environ={})
    with pytest.raises(ConfigError, match="--process-id must be in \\[0, 2\\)"):
        distributed.resolve("host0:1234", 2, 2, environ={})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        distributed.resolve("host0", 2, 0, environ={})


def test_cli_bad_multi_process_flags_are_one_line_errors(capsys, tmp_path):
    assert main(["train", "--coordinator", "localhost:1", "--num-processes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing --process-id" in err
    code = main(["train", "--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "0"])
    assert code == 2 and "needs --run-dir" in capsys.readouterr().err
    assert main(["train", "--param-sharding", "zero3", "--run-dir", str(tmp_path)]) == 2
    assert "param_sharding='zero3': use one of replicated, fsdp" in capsys.readouterr().err


def test_runtime_aborts_after_a_lost_peer_are_recognised():
    """Both ways JAX's runtime aborts a survivor become the one-line PeerProcessLost in the supervisor."""
    poller = b"F0000 ... Polled an error from coordination service (this can be an error from this or another task)"
    barrier = (  # a peer killed while Orbax was finishing an asynchronous checkpoint (seen in CI)
        b"jax.errors.JaxRuntimeError: INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 "
        b"heartbeat timeout. ...\n*** Check failure stack trace: ***\n    @ xla::CoordinationServiceAgent::SetError()"
    )
    assert distributed.lost_a_peer(134, poller) and distributed.lost_a_peer(134, barrier)
    assert not distributed.lost_a_peer(0, barrier)  # a run that ended well
    assert not distributed.lost_a_peer(1, b"flaxvision: error: the dataset has no split 'validation'")
