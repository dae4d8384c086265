"""Sharded data read in place: the per-process order (disjoint, balanced, own shards), tar shards and streamed
parquet through the loader, resume, and damaged or vanished shards."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from flaxvision.errors import FlaxvisionError
from tests.helpers import colour_data, write_tar_shards


def _pre(size: int = 16):
    from flaxvision.preprocessing import Preprocessing

    return Preprocessing(img_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0, resize_mode="squash")


# ---- the order ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 3, 4, 7])
@pytest.mark.parametrize("shuffle", [False, True])
def test_processes_read_disjoint_balanced_runs_of_whole_shards(processes, shuffle):
    from flaxvision.data.shard_order import process_order

    shard_of = np.repeat(np.arange(12), [40, 35, 50, 40, 40, 38, 41, 40, 39, 40, 44, 33])  # 12 uneven shards
    n = len(shard_of)
    for epoch in (0, 1):
        runs = [process_order(shard_of, epoch, seed=5, shuffle=shuffle, process=p, processes=processes, buffer=64)
                for p in range(processes)]  # fmt: skip
        everything = np.concatenate(runs)
        assert len(everything) == n and len(np.unique(everything)) == n  # every example exactly once
        assert max(map(len, runs)) - min(map(len, runs)) <= 1
        for run in runs:  # a run is whole shards except at its two ends
            shards = np.unique(shard_of[run])
            partial = [s for s in shards if (shard_of[run] == s).sum() < (shard_of == s).sum()]
            assert len(partial) <= 2
            assert len(shards) <= -(-12 // processes) + 2
        again = process_order(shard_of, epoch, seed=5, shuffle=shuffle, process=0, processes=processes, buffer=64)
        np.testing.assert_array_equal(again, runs[0])  # a pure function: resume needs no saved buffer
    first = process_order(shard_of, 0, seed=5, shuffle=shuffle, process=0, processes=processes, buffer=64)
    second = process_order(shard_of, 1, seed=5, shuffle=shuffle, process=0, processes=processes, buffer=64)
    assert (not np.array_equal(first, second)) == shuffle  # shard order and buffer change per epoch when training


def test_the_shuffle_buffer_is_bounded():
    """An example leaves the buffer only after it was read: output i never comes from beyond input i + buffer."""
    from flaxvision.data.shard_order import buffer_shuffle

    items = np.arange(5000)
    out = buffer_shuffle(items, 100, np.random.default_rng(0))
    assert sorted(out.tolist()) == items.tolist()
    assert np.all(out[: 5000 - 100] < np.arange(5000 - 100) + 100)
    assert np.mean(np.abs(out - items)) > 20  # and it does shuffle


def test_fewer_shards_than_processes_split_rows_within_shards():
    from flaxvision.data.shard_order import process_order

    shard_of = np.repeat([0, 1], 50)
    runs = [process_order(shard_of, 0, seed=0, shuffle=True, process=p, processes=4, buffer=8) for p in range(4)]
    assert sorted(np.concatenate(runs).tolist()) == list(range(100))
    assert all(len(r) == 25 and len(np.unique(shard_of[r])) == 1 for r in runs)


# ---- tar shards through the loader -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    x, y = colour_data(96, 3)
    write_tar_shards(root, x, y, per_shard=10)
    xv, yv = colour_data(20, 4)
    write_tar_shards(root, xv, yv, per_shard=8, split="val")
    return root, (x, y), (xv, yv)


def test_tar_shards_load_with_splits_from_file_names_and_images_as_written(tars):
    from flaxvision import data

    root, (x, y), (xv, yv) = tars
    splits = data.load(str(root))
    assert len(splits.train) == 96 and len(splits.val) == 20 and not splits.val_held_out
    assert splits.class_names == ("0", "1", "2", "3")
    import io

    from PIL import Image

    for position in (0, 37, 95):
        item = splits.train[position]
        image = np.asarray(Image.open(io.BytesIO(item["image"])))
        key = int(splits.train.images.keys[item["id"]])
        np.testing.assert_array_equal(image, x[key])
        assert item["label"] == y[key]
    pattern = data.load(str(root / "train-{000000..000009}.tar") + "," + str(root / "val-*.tar"))
    assert len(pattern.train) == 96 and len(pattern.val) == 20


@pytest.mark.parametrize("train", [False, True])
def test_four_processes_read_every_example_once_per_epoch_each_from_its_own_shards(tars, train):
    from flaxvision import data

    root, _, _ = tars
    source = data.load(str(root)).train  # 96 examples in 10 shards (9 of 10, 1 of 6)
    seen = {}
    for process in range(4):
        loader = data.make_loader(source, preprocessing=_pre(), batch_size=8, train=train, seed=1, shard_index=process,
                                  shard_count=4, shuffle_buffer=16)  # fmt: skip
        assert len(loader) == 3  # 96 / 4 = 24 each = 3 batches of 8
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            ids = np.concatenate([b["id"][b["mask"]] for b in loader])
            seen[(process, epoch)] = ids
    for epoch in (0, 1):
        everything = np.concatenate([seen[(p, epoch)] for p in range(4)])
        assert sorted(everything.tolist()) == list(range(96))
        for p in range(4):  # each process reads at most 4 of the 10 shards (its quarter, plus the ends)
            assert len(np.unique(source.images.shard_of(seen[(p, epoch)]))) <= 4
    if train:
        assert not np.array_equal(seen[(0, 0)], seen[(0, 1)])


def test_a_sharded_loader_resumes_mid_epoch_exactly(tars):
    from flaxvision import data

    root, _, _ = tars
    source = data.load(str(root)).train

    def loader():
        return data.make_loader(source, preprocessing=_pre(), batch_size=8, train=True, seed=2, shard_index=1,
                                shard_count=2, shuffle_buffer=16)  # fmt: skip

    straight = [b for b in loader()]
    it = iter(loader())
    first = next(it)
    state = it.get_state()
    resumed = iter(loader())
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(straight) - 1
    for a, b in zip([first, *rest], straight):
        np.testing.assert_array_equal(a["id"], b["id"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_a_truncated_tar_keeps_what_precedes_the_damage_and_a_vanished_shard_is_skipped_and_counted(tmp_path, caplog):
    from flaxvision import data

    x, y = colour_data(40, 5)
    paths = write_tar_shards(tmp_path, x, y, per_shard=10)
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[: len(raw) // 2])  # cut at a header
    raw = paths[3].read_bytes()
    paths[3].write_bytes(raw[: len(raw) // 2 + 700])  # cut inside a member
    with caplog.at_level(logging.WARNING, logger="flaxvision.data"):
        source = data.load(str(tmp_path), val_fraction=0.25).train
    for damaged in ("train-000001.tar", "train-000003.tar"):
        assert any("truncated" in r.getMessage() and damaged in r.getMessage() for r in caplog.records), damaged
    total = len(source) + len(data.load(str(tmp_path), val_fraction=0.25).val)
    assert 20 < total < 40  # the samples before the cuts are kept
    paths[2].unlink()  # a shard vanishes after the dataset was opened (an object store losing it mid-run)
    source.images.close()  # (a process that had it open could still read it: start from closed files)
    loader = data.make_loader(source, preprocessing=_pre(), batch_size=4, train=False, shard_index=0, shard_count=1)
    valid = sum(int(b["mask"].sum()) for b in loader)
    lost = int((source.images.shard_of(source.ids) == 2).sum())
    assert lost > 0 and valid == len(source) - lost
    assert loader.skipped.count == lost
    report = loader.skipped.to_dict()["epochs"]["0"]
    assert all("train-000002.tar" in r["where"] and "cannot read it" in r["reason"] for r in report)


def test_bad_shard_specs_are_one_clear_error(tmp_path):
    from flaxvision import data
    from flaxvision.data import shards

    x, y = colour_data(10, 0)
    write_tar_shards(tmp_path, x, y, per_shard=5)
    with pytest.raises(FlaxvisionError, match=r"train-000002.tar does not exist"):
        data.load(str(tmp_path / "train-{000000..000002}.tar"))
    with pytest.raises(FlaxvisionError, match="counts down"):
        shards.expand_braces("a-{9..1}.tar")
    assert shards.expand_braces("s-{08..10}-{a,b}.tar") == ["s-08-a.tar", "s-08-b.tar", "s-09-a.tar", "s-09-b.tar",
                                                           "s-10-a.tar", "s-10-b.tar"]  # fmt: skip
    empty = tmp_path / "empty.tar"
    import tarfile

    tarfile.open(empty, "w").close()
    with pytest.raises(FlaxvisionError, match="no samples with an image and a .cls label"):
        data.load(str(empty))


# ---- parquet shards streamed in place (the Hub's layout) ---------------------------------------------------------


@pytest.fixture(scope="module")
def hub_parquet(tmp_path_factory):
    """A local copy of a Hub dataset repository: data/<split>-0000K-of-0000N.parquet written by `datasets`."""
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("hubrepo")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "green", "blue", "grey"])})
    for split, n, seed, files in (("train", 60, 1, 3), ("validation", 20, 2, 1)):
        x, y = colour_data(n, seed)
        ds = datasets.Dataset.from_dict({"image": [Image.fromarray(i) for i in x], "label": y.tolist()}, features=features)
        (root / "data").mkdir(exist_ok=True)
        for k in range(files):
            ds.shard(files, k, contiguous=True).to_parquet(str(root / "data" / f"{split}-{k:05d}-of-{files:05d}.parquet"),
                                                          batch_size=8)  # fmt: skip
    return root


def test_streamed_parquet_matches_the_copied_dataset_and_reads_each_example_once(hub_parquet):
    from flaxvision import data

    streamed = data.load(str(hub_parquet), streaming=True)
    copied = data.load(str(hub_parquet))
    assert streamed.class_names == copied.class_names == ("red", "green", "blue", "grey")
    assert getattr(streamed.train.images, "streaming", False) and not getattr(copied.train.images, "streaming", False)
    assert len(streamed.train) == len(copied.train) == 60 and len(streamed.val) == 20
    np.testing.assert_array_equal(streamed.train.labels, copied.train.labels)
    for position in (0, 31, 59):
        assert streamed.train[position]["image"] == copied.train[position]["image"]
    ids = []
    for process in range(2):
        loader = data.make_loader(streamed.train, preprocessing=_pre(), batch_size=10, train=True, seed=0,
                                  shard_index=process, shard_count=2, shuffle_buffer=8)  # fmt: skip
        ids += [b["id"][b["mask"]] for b in loader]
    assert sorted(np.concatenate(ids).tolist()) == list(range(60))


def test_a_truncated_parquet_shard_is_left_out_and_a_vanished_one_skipped_and_counted(hub_parquet, tmp_path, caplog):
    import shutil

    from flaxvision import data

    root = tmp_path / "repo"
    shutil.copytree(hub_parquet, root)
    cut = root / "data" / "train-00001-of-00003.parquet"
    raw = cut.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])  # its footer (the row groups' index) is gone: nothing in it is readable
    with caplog.at_level(logging.WARNING, logger="flaxvision.data"):
        streamed = data.load(str(root), streaming=True)
    assert any("train-00001-of-00003.parquet: unreadable parquet shard left out" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert len(streamed.train) == 40  # the 20 rows of each of the two intact files
    (root / "data" / "train-00002-of-00003.parquet").unlink()  # vanishes after the dataset was opened
    streamed.train.images.close()
    loader = data.make_loader(streamed.train, preprocessing=_pre(), batch_size=8, train=False)
    assert sum(int(b["mask"].sum()) for b in loader) == 20 and loader.skipped.count == 20
    for path in (root / "data").glob("validation-*.parquet"):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FlaxvisionError, match=r"none of the parquet shards could be read \(.*validation-00000-of-00001.parquet"):
        data.load(str(root), streaming=True)


def test_streaming_a_folder_is_refused_and_sharded_data_is_never_held_in_memory(tmp_path, tars):
    from flaxvision import data
    from flaxvision.errors import ConfigError
    from flaxvision.train.config import TrainConfig
    from flaxvision.train.recipe import in_memory_reason

    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FlaxvisionError, match="--streaming reads parquet files or a Hub dataset"):
        data.load(str(tmp_path), streaming=True)
    root, _, _ = tars
    splits = data.load(str(root))
    from tests.helpers import tiny_vit

    model = tiny_vit()
    reason = in_memory_reason(TrainConfig(dataset=str(root)), model, splits.train, splits.val)
    assert reason is not None and "sharded" in reason
    with pytest.raises(ConfigError, match="sharded"):
        in_memory_reason(TrainConfig(dataset=str(root), in_memory="on"), model, splits.train, splits.val)


def test_remote_storage_without_its_filesystem_package_names_the_package():
    from flaxvision.data import shards

    pytest.importorskip("fsspec")
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    with pytest.raises(FlaxvisionError, match="s3fs"):
        shards.filesystem("s3://bucket/shards/train-000000.tar")


# ---- remote storage: the fsspec path, on fsspec's in-memory filesystem -------------------------------------------


def test_remote_shards_and_a_packed_manifest_read_through_fsspec_and_a_vanished_remote_shard_is_skipped_and_counted(
        tmp_path, monkeypatch):  # fmt: skip
    import fsspec

    from flaxvision import data
    from flaxvision.data import shards
    from flaxvision.data.pack import pack

    monkeypatch.setattr(shards.time, "sleep", lambda seconds: None)  # (the retries' back-off)
    memory = fsspec.filesystem("memory")
    x, y = colour_data(24, 8)
    local = write_tar_shards(tmp_path / "wds", x, y, per_shard=6)
    for path in local:
        memory.pipe(f"/bucket/wds/{path.name}", path.read_bytes())
    remote = data.load("memory://bucket/wds/train-{000000..000003}.tar", val_fraction=0.25)
    assert getattr(remote.train.images, "streaming", False) and len(remote.train) + len(remote.val) == 24
    assert data.load("memory://bucket/wds/*.tar", val_fraction=0.25).train.labels.tolist() == remote.train.labels.tolist()
    reference = data.load(str(tmp_path / "wds"), val_fraction=0.25)
    for position in range(len(remote.train)):
        assert remote.train[position]["image"] == reference.train[position]["image"]

    packed = pack(str(tmp_path / "wds"), tmp_path / "packed", shard_size=4 * 1024, progress=False)
    for path in packed.rglob("*"):
        if path.is_file():
            memory.pipe(f"/bucket/packed/{path.relative_to(packed)}", path.read_bytes())
    from_manifest = data.load("memory://bucket/packed", val_fraction=0.25)
    assert len(from_manifest.train) + len(from_manifest.val) == 24

    memory.rm("/bucket/wds/train-000001.tar")  # the object store loses a shard mid-run
    remote.train.images.close()
    loader = data.make_loader(remote.train, preprocessing=_pre(), batch_size=6, train=False)
    valid = sum(int(b["mask"].sum()) for b in loader)
    lost = int((remote.train.images.shard_of(remote.train.ids) == 1).sum())
    assert lost > 0 and valid == len(remote.train) - lost and loader.skipped.count == lost


def test_streaming_a_hub_dataset_offline_is_one_clear_error(monkeypatch):
    from flaxvision import data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FlaxvisionError, match="streaming Hub dataset 'ethz/food101' needs the Hub, and offline mode is on"):
        data.load("ethz/food101", streaming=True)


def test_a_state_saved_by_two_processes_resumes_in_one_at_the_same_global_batch(tars):
    """Another process count: the same step, the new partition for the rest of the epoch, every example once from
    the next epoch on (the guarantee docs/DISTRIBUTED.md states)."""
    from flaxvision import data

    root, _, _ = tars
    source = data.load(str(root)).train

    def loader(index, count):
        return data.make_loader(source, preprocessing=_pre(), batch_size=16 // count, train=True, seed=4,
                                shard_index=index, shard_count=count, num_epochs=2, shuffle_buffer=8)  # fmt: skip

    it = iter(loader(0, 2))
    for _ in range(2):
        next(it)
    state = it.get_state()
    assert (state["epoch"], state["batch"]) == (0, 2)
    one = loader(0, 1)
    resumed = iter(one)
    resumed.set_state(state)
    batches = list(resumed)
    assert len(batches) == (len(one) - 2) + len(one)  # the rest of epoch 0, then all of epoch 1
    next_epoch = np.concatenate([b["id"][b["mask"]] for b in batches[len(one) - 2:]])
    assert len(np.unique(next_epoch)) == len(next_epoch) == len(one) * 16

