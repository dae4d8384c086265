"""--log-to tensorboard,wandb,mlflow: what a real tiny fit leaves in each tracker, read back with the trackers' own
readers (TensorBoard's EventAccumulator, the records of wandb's offline run file, MlflowClient), compared with
metrics.jsonl record by record; a crash and resume; a tracker that fails mid-run; the checks before anything is
written.
"""

from __future__ import annotations

import importlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flaxvision.errors import ConfigError
from flaxvision.train import TrainConfig, fit
from tests.helpers import CLASS_NAMES, batches, colour_data, colour_fit_kwargs, run_cli, small_config, tiny_vit, tmpfs

ALL = "tensorboard,wandb,mlflow"


@pytest.fixture(autouse=True, scope="module")
def offline_trackers():
    """The trackers' defaults: no WANDB_MODE (so: offline), no MLFLOW_TRACKING_URI (so: the run's own store)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """2 epochs of 4 steps (a train record every 2 steps, an epoch and an eval record per epoch) with the report."""
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    fit(small_config(log_to=ALL, report=True), run_dir=run_dir, **colour_fit_kwargs())
    return run_dir


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers by tag "<type>/<field>": [(step, value)], in order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records(run_dir):
        for key, value in r.items():
            if key not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(f"{r['type']}/{key}", []).append((r["step"], float(value)))
    return series


def tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def tensorboard_scalars(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def as_float32(series: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """TensorBoard keeps a scalar as float32."""
    return [(step, float(np.float32(value))) for step, value in series]


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlruns' / 'mlflow.db').resolve()}")


def ids(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "tracking.json").read_text())


# ---- wandb's offline run file: a LevelDB-style log of protobuf records ----------------------------------------
# wandb >= 0.2x no longer ships a Python reader (its core is in Go); the format: a 7-byte header (":W&B", 0xBEE1,
# version 0), then 32 KiB blocks of chunks, each (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last).


def wandb_records(path: Path) -> list[Any]:
    wandb_internal_pb2: Any = importlib.import_module("wandb.proto.wandb_internal_pb2")  # (generated: no stubs)
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1 and data[6] == 0, data[:7]
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # the zero padding at a block's end
            pos += room
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wandb_runs(run_dir: Path) -> list[tuple[str, dict[str, Any], dict[int, dict[str, Any]]]]:
    """Each offline run (oldest first): (run id, config, history rows by step)."""
    runs = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id, config, rows = "", {}, {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "history":
                row = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.history.item}
                rows[row["_step"]] = row
        runs.append((run_id, config, rows))
    return runs


# ---- one fit, every tracker ---------------------------------------------------------------------------------------


def test_the_tensorboard_event_file_holds_every_scalar_the_figures_and_the_hyperparameters(tracked):
    plugin_data_pb2: Any = importlib.import_module("tensorboard.plugins.hparams.plugin_data_pb2")  # (generated: no stubs)
    acc = tensorboard(tracked)
    want = expected(tracked)
    got = tensorboard_scalars(acc)
    assert {"train/loss", "eval/val_accuracy", "epoch/images_per_second", "train/lr"} <= set(want)
    assert {t for t in got if not t.startswith("final/")} == set(want)
    for tag, series in want.items():
        assert got[tag] == as_float32(series), tag  # every step, every value, nothing twice
    summary = json.loads((tracked / "summary.json").read_text())
    assert got["final/best_val_accuracy"] == [(8, float(np.float32(summary["best_val_accuracy"])))]

    pngs = sorted(tracked.glob("*.png"))
    assert len(pngs) >= 3, pngs
    assert set(acc.Tags()["images"]) == {f"report/{p.stem}" for p in pngs}
    from PIL import Image

    with Image.open(pngs[0]) as picture:
        assert (acc.Images(f"report/{pngs[0].stem}")[0].width, acc.Images(f"report/{pngs[0].stem}")[0].height) == picture.size
    assert acc.Images(f"report/{pngs[0].stem}")[0].encoded_image_string == pngs[0].read_bytes()

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(3e-3)
    assert start.hparams["optimizer"].string_value == "adamw"
    assert start.hparams["model_overrides.depth"].number_value == 1
    assert start.hparams["log_to"].string_value == ALL
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "final/final_val_accuracy" in {m.name.tag for m in experiment.metric_infos}
    recipe_text = acc.Tensors("recipe")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 0.003' in recipe_text


def test_the_wandb_offline_run_holds_every_record_the_recipe_and_the_figures(tracked):
    (run_id, config, rows), = wandb_runs(tracked)
    assert run_id == ids(tracked)["wandb_id"]
    assert config["lr"] == 3e-3 and config["model_overrides"] == {**config["model_overrides"], "depth": 1}
    for tag, series in expected(tracked).items():
        for step, value in series:
            assert rows[step][tag] == value, (tag, step)  # JSON doubles: exact
    pngs = sorted(tracked.glob("*.png"))
    last = rows[max(rows)]
    for png in pngs:
        assert last[f"report/{png.stem}/_type"] == "image-file"
        assert (next(tracked.glob("wandb/offline-run-*/files")) / last[f"report/{png.stem}/path"]).is_file()


def test_the_mlflow_store_holds_every_metric_with_its_step_the_params_and_the_figures(tracked):
    client = mlflow_client(tracked)
    run = client.get_run(ids(tracked)["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["lr"] == "0.003" and run.data.params["model_overrides.depth"] == "1"
    assert run.data.params["log_to"] == ALL and run.data.params["pretrained"] == "None"
    for tag, series in expected(tracked).items():
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)] == series, tag
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {f"report/{p.name}" for p in tracked.glob("*.png")}
    assert (tracked / "mlruns" / "artifacts").is_dir()  # the artifacts stay in the run directory


# ---- a crash and a resume -------------------------------------------------------------------------------------------


class CrashAt(list):
    """Batches whose iteration raises at global step `crash` (1-based), as a failing disk would; nothing saves."""

    def __init__(self, items, crash: int | None, per_epoch: int):
        super().__init__(items)
        self.crash, self.per_epoch, self.epoch = crash, per_epoch, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        for i, b in enumerate(super().__iter__()):
            if self.crash is not None and self.epoch * self.per_epoch + i + 1 == self.crash:
                raise OSError("the data disk went away")
            yield b


def test_a_crashed_run_resumed_continues_the_same_runs_and_tensorboard_has_no_duplicate_tail(tmp_path):
    xt, yt = colour_data(128, 0)
    xv, yv = colour_data(32, 1)
    config = small_config(log_to=ALL, log_every=1, checkpoint_every=None)  # checkpoints at epoch ends; a train record every step
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="data disk"):
        fit(config, run_dir=run_dir, model=tiny_vit(), train_data=CrashAt(batches(xt, yt, 32), 8, 4),
            val_data=batches(xv, yv, 16), class_names=CLASS_NAMES)  # fmt: skip
    # The crash came after steps past the last checkpoint (the epoch end, 4) were logged: those will be redone.
    crashed = [r["step"] for r in records(run_dir) if r["type"] == "train"]
    assert crashed == list(range(1, crashed[-1] + 1)) and crashed[-1] >= 6, crashed  # (the loop reads ahead)
    assert [s for s, _ in tensorboard_scalars(tensorboard(run_dir))["train/loss"]] == crashed  # flushed on the way out
    first_ids = ids(run_dir)
    assert mlflow_client(run_dir).get_run(first_ids["mlflow_run_id"]).info.status == "FAILED"

    fit(config.replace(lr=1e-3), run_dir=run_dir, resume=True, allow_changes=True, model=tiny_vit(),
        train_data=batches(xt, yt, 32), val_data=batches(xv, yv, 16), class_names=CLASS_NAMES)  # fmt: skip
    want = expected(run_dir)
    assert [s for s, _ in want["train/loss"]] == list(range(1, 9))
    got = tensorboard_scalars(tensorboard(run_dir))
    for tag, series in want.items():
        assert got[tag] == as_float32(series), tag  # the crashed run's steps after 4 are gone: the resumed ones only

    assert ids(run_dir) == first_ids
    (first, _, first_rows), (second, second_config, rows) = wandb_runs(run_dir)
    assert first == second == first_ids["wandb_id"]
    assert sorted(first_rows) == crashed and min(rows) == 5
    assert second_config["lr"] == 1e-3
    for tag, series in want.items():
        for step, value in series:
            if step >= 5:
                assert rows[step][tag] == value, (tag, step)

    client = mlflow_client(run_dir)
    run = client.get_run(first_ids["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.003"  # MLflow params cannot change: the first value stays
    history = {(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert set(want["train/loss"]) <= history


# ---- a tracker that fails mid-run ---------------------------------------------------------------------------------------


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning_and_the_run_finishes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with tmpfs(run_dir / "tensorboard", "4k"):  # room for the first events only
        capsys.readouterr()
        result = fit(small_config(log_to="tensorboard,wandb", log_every=1), run_dir=run_dir, **colour_fit_kwargs())
        err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "tensorboard failed" in line]
    assert len(warnings) == 1, err[-3000:]
    assert "OSError" in warnings[0] and "the run goes on without tensorboard" in warnings[0]
    assert result.summary["steps"] == 8 and (run_dir / "summary.json").is_file()
    want = expected(run_dir)
    assert [s for s, _ in want["train/loss"]] == list(range(1, 9))  # metrics.jsonl is complete
    (_, _, rows), = wandb_runs(run_dir)
    for tag, series in want.items():  # the other tracker got everything
        assert [(step, rows[step][tag]) for step, _ in series] == series, tag


# ---- checks before anything is written ----------------------------------------------------------------------------


@pytest.mark.parametrize(("missing", "log_to", "message"), [
    ("wandb", ALL, "--log-to wandb needs the wandb package: pip install 'flaxvision[wandb]'"),
    ("tensorboard", "tensorboard", "--log-to tensorboard needs the tensorboard package: pip install 'flaxvision[tensorboard]'"),
    ("sqlalchemy", "mlflow", "--log-to mlflow needs the sqlalchemy package: pip install 'flaxvision[mlflow]'"),
])  # fmt: skip
def test_a_missing_package_is_one_line_naming_the_extra_and_nothing_is_written(missing, log_to, message, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # what importing it would find: nothing installed
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        fit(small_config(log_to=log_to), run_dir=run_dir, **colour_fit_kwargs())
    assert str(info.value) == message
    assert not run_dir.exists()


def test_the_cli_refuses_a_missing_package_and_an_unknown_tracker_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    code, out, err = run_cli(["train", "--run-dir", tmp_path / "run", "--log-to", "mlflow", "--max-train-samples", "64"], capsys)
    assert code == 2 and "--log-to mlflow needs the mlflow package: pip install 'flaxvision[mlflow]'" in err, (out, err)
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    code, out, err = run_cli(["train", "--run-dir", tmp_path / "run", "--log-to", "tensorbord"], capsys)
    assert code == 2 and "unknown tracker 'tensorbord' (did you mean tensorboard?)" in err, (out, err)
    assert not (tmp_path / "run").exists()
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0 and "--log-to" in out and "tensorboard, wandb, mlflow" in " ".join(out.split())


def test_log_to_names_any_subset_and_refuses_unknown_names():
    assert TrainConfig(log_to="mlflow, tensorboard").log_to == "mlflow, tensorboard"
    from flaxvision.train.config import log_to_names

    assert log_to_names("wandb,tensorboard,wandb") == ("wandb", "tensorboard")
    with pytest.raises(ConfigError, match=r"^log_to='tensorboard,comet': unknown tracker 'comet'; use any of tensorboard, wandb, mlflow"):
        TrainConfig(log_to="tensorboard,comet")
    with pytest.raises(ConfigError, match="name one or more of"):
        TrainConfig(log_to=" , ")


def test_only_process_0_tracks(tmp_path):
    from flaxvision.train.tracking import Trackers

    record = {"train_config": small_config(log_to=ALL).to_dict()}
    trackers = Trackers.open(ALL, tmp_path, record, step=0, resumed=False, is_main=False)
    trackers.log_record({"type": "train", "step": 1, "loss": 1.0})
    trackers.close()
    assert trackers.names == [] and list(tmp_path.iterdir()) == []
