"""`flaxvision data pack`: shards, manifest and index that read back as the source was; resize-on-pack; nothing
partial left behind."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flaxvision.errors import FlaxvisionError
from tests.helpers import assert_unchanged, colour_data, error_lines, run_cli, snapshot, temp_leftovers


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder: train/<class>/*.png (30 images, one of them corrupt) and val/<class>/*.png (8)."""
    root = tmp_path_factory.mktemp("folder")
    names = ["red", "green", "blue", "grey"]
    for split, n, seed in (("train", 30, 0), ("val", 8, 1)):
        x, y = colour_data(n, seed)
        for i, (image, label) in enumerate(zip(x, y)):
            d = root / split / names[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(d / f"{i:03d}.png")
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def _decoded(source) -> dict[str, list[bytes]]:
    """Class name -> the sorted pixels of its decodable images (a corrupt one is what pack leaves out)."""
    out: dict[str, list[bytes]] = {}
    for position in range(len(source)):
        item = source[position]
        data = item["image"] if isinstance(item["image"], bytes) else Path(item["image"]).read_bytes()
        try:
            pixels = np.asarray(Image.open(io.BytesIO(data))).tobytes()
        except Exception:
            continue
        out.setdefault(source.class_names[item["label"]], []).append(pixels)
    return {k: sorted(v) for k, v in out.items()}


def _same_images(packed, original) -> None:
    assert packed.class_names == original.class_names
    assert _decoded(packed) == _decoded(original)


@pytest.mark.parametrize("kind", ["wds", "arrayrecord"])
def test_pack_writes_shards_a_manifest_and_an_index_that_read_back_as_the_source(folder, tmp_path, kind, caplog):
    from flaxvision import data
    from flaxvision.data.pack import pack

    out = pack(str(folder), tmp_path / "packed", kind=kind, shard_size=8 * 1024, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == kind and manifest["class_names"] == ["blue", "green", "grey", "red"]
    train = manifest["splits"]["train"]
    assert train["count"] == 30 and len(train["shards"]) > 1  # 8 kB shards: several
    assert sum(s["count"] for s in train["shards"]) == 30
    assert sum(train["class_counts"].values()) == 30
    for shard in train["shards"]:
        assert hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
        assert (out / shard["path"]).stat().st_size == shard["bytes"]
    (skipped,) = manifest["skipped"]["train"]
    assert "broken.png" in skipped["where"]
    packed, original = data.load(str(out)), data.load(str(folder))
    assert getattr(packed.train.images, "streaming", False)
    _same_images(packed.train, original.train)
    _same_images(packed.val, original.val)


def test_pack_with_workers_writes_the_same_shards(folder, tmp_path):
    from flaxvision.data.pack import pack

    one = json.loads((pack(str(folder), tmp_path / "a", shard_size=8 * 1024, progress=False) / "manifest.json").read_text())
    two = json.loads((pack(str(folder), tmp_path / "b", shard_size=8 * 1024, workers=2, progress=False)
                      / "manifest.json").read_text())  # fmt: skip
    assert [s["sha256"] for s in one["splits"]["train"]["shards"]] == [s["sha256"] for s in two["splits"]["train"]["shards"]]


def test_resize_on_pack_shrinks_large_photos_to_jpeg_and_keeps_small_ones(tmp_path):
    from flaxvision import data
    from flaxvision.data.pack import pack

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "src" / label).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(tmp_path / "src" / label / "big.png")
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "src" / label / "small.png")
    out = pack(str(tmp_path / "src"), tmp_path / "out", resize=64, quality=85, progress=False)
    split = data.load(str(out), val_fraction=0.5)
    images = [Image.open(io.BytesIO(s["image"])) for s in (split.train[i] for i in range(len(split.train)))]
    images += [Image.open(io.BytesIO(s["image"])) for s in (split.val[i] for i in range(len(split.val)))]
    big = [im for im in images if im.format == "JPEG"]
    small = [im for im in images if im.format == "PNG"]
    assert len(big) == 2 and all(im.size == (64, 96) for im in big)  # shorter side 64, aspect kept
    assert len(small) == 2 and all(im.size == (50, 40) for im in small)  # not enlarged, original bytes


def test_training_reads_packed_shards(folder, tmp_path, capsys):
    from flaxvision.data.pack import pack

    out = pack(str(folder), tmp_path / "packed", shard_size=8 * 1024, progress=False)
    run_dir = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--dataset", str(out), "--run-dir", run_dir, "--epochs", "1", "--batch-size", "8",
                                 "--model", "cnn", "--img-size", "16", "--no-progress", "--no-report"], capsys)  # fmt: skip
    assert code == 0, err
    config = json.loads((run_dir / "config.json").read_text())
    assert config["class_names"] == ["blue", "green", "grey", "red"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 // 8 and summary["final_val_accuracy"] is not None


@pytest.mark.parametrize("case", ["out not empty", "bad size", "bad format", "no such split", "bad quality"])
def test_bad_pack_input_is_one_line_and_writes_nothing(folder, tmp_path, capsys, case):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    args, message = {
        "out not empty": (["--out", taken], "already exists and is not empty"),
        "bad size": (["--out", tmp_path / "o", "--shard-size", "lots"], "--shard-size 'lots'"),
        "bad format": (["--out", tmp_path / "o", "--format", "zip"], "invalid choice"),
        "no such split": (["--out", tmp_path / "o", "--split", "holdout"], "has no split 'holdout'"),
        "bad quality": (["--out", tmp_path / "o", "--resize", "64", "--quality", "0"], "--quality 0"),
    }[case]
    before = snapshot(tmp_path)
    code, _, err = run_cli(["data", "pack", str(folder), *args], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and message in err, err
    assert_unchanged(tmp_path, before)


def test_an_interrupted_pack_leaves_no_directory_and_no_temporary_files(folder, tmp_path, monkeypatch):
    from flaxvision.data import pack as pack_module

    calls = {"n": 0}
    real = pack_module._ShardWriter.add

    def interrupt(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(pack_module._ShardWriter, "add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pack_module.pack(str(folder), tmp_path / "out", shard_size=4 * 1024, progress=False)
    assert not (tmp_path / "out").exists() and temp_leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_a_manifest_from_elsewhere_is_refused_clearly(tmp_path):
    from flaxvision import data

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FlaxvisionError, match="is not a flaxvision shard manifest"):
        data.load(str(tmp_path))


def test_pack_shuffles_a_class_sorted_source_unless_told_to_keep_its_order(folder, tmp_path):
    from flaxvision.data.pack import pack

    def first_shard_classes(out):
        manifest = json.loads((out / "manifest.json").read_text())
        return len(manifest["splits"]["train"]["shards"][0]["class_counts"])

    shuffled = pack(str(folder), tmp_path / "shuffled", shard_size=16 * 1024, progress=False)
    kept = pack(str(folder), tmp_path / "kept", shard_size=16 * 1024, progress=False, seed=None)
    assert first_shard_classes(shuffled) >= 2 and first_shard_classes(kept) == 1  # an image folder is class-sorted


def test_a_damaged_member_of_a_packed_shard_is_skipped_and_named_by_its_source_row(folder, tmp_path):
    from flaxvision import data
    from flaxvision.data.pack import pack
    from flaxvision.preprocessing import Preprocessing

    out = pack(str(folder), tmp_path / "packed", shard_size=4 * 1024, progress=False)
    source = data.load(str(out)).train
    images = source.images
    row = int(source.ids[3])
    path = Path(images.paths[int(images.shard[row])])
    raw = bytearray(path.read_bytes())
    offset, size = int(images.offset[row]), int(images.size[row])
    raw[offset:offset + size] = b"\0" * size  # the image's bytes destroyed in place
    path.write_bytes(bytes(raw))
    images.close()
    pre = Preprocessing(img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, resize_mode="squash")
    loader = data.make_loader(source, preprocessing=pre, batch_size=8, train=False)
    assert sum(int(b["mask"].sum()) for b in loader) == len(source) - 1 and loader.skipped.count == 1
    (entry,) = loader.skipped.to_dict()["epochs"]["0"]
    assert f"(row {int(images.keys[row])} of the packed source)" in entry["where"] and path.name in entry["where"]


def test_arrayrecord_shards_on_remote_storage_are_refused_at_once(folder, tmp_path):
    import fsspec

    from flaxvision import data
    from flaxvision.data.pack import pack
    from flaxvision.data.shard_sources import sharded_kind

    out = pack(str(folder), tmp_path / "ar", kind="arrayrecord", progress=False)
    memory = fsspec.filesystem("memory")
    for path in out.rglob("*"):
        if path.is_file():
            memory.pipe(f"/bucket/ar/{path.relative_to(out)}", path.read_bytes())
    with pytest.raises(FlaxvisionError, match="ArrayRecord shards are read from a local or mounted file system"):
        data.load("memory://bucket/ar")
    assert sharded_kind("s3://bucket/data/train-*.parquet") == "parquet"
    assert sharded_kind("s3://bucket/wds/train-{0..9}.tar") == "wds" and sharded_kind("gs://bucket/packed") == "manifest"


def test_a_killed_packs_temporary_directory_is_removed_by_the_next_pack_and_a_live_ones_is_kept(folder, tmp_path):
    import os
    import socket
    import subprocess

    from flaxvision.data.pack import _OWNER, pack

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, foreign = (tmp_path / f".out.{tag}.tmp" for tag in ("stale", "live", "foreign"))
    for path, host, pid in ((stale, socket.gethostname(), dead.pid), (live, socket.gethostname(), os.getpid()),
                            (foreign, "another-host", dead.pid)):  # fmt: skip
        path.mkdir()
        (path / "train").mkdir()
        (path / _OWNER).write_text(json.dumps({"host": host, "pid": pid}))
    out = pack(str(folder), tmp_path / "out", shard_size=16 * 1024, progress=False)
    assert not stale.exists() and live.exists() and foreign.exists()
    assert not (out / _OWNER).exists() and (out / "manifest.json").is_file()


def test_a_cls_value_far_beyond_any_class_count_is_refused(tmp_path):
    from flaxvision import data
    from tests.helpers import write_tar_shards

    x, y = colour_data(4, 0)
    y = y.astype(np.int64)
    y[2] = 99_999_999
    write_tar_shards(tmp_path, x, y, per_shard=4)
    with pytest.raises(FlaxvisionError, match="has .cls 99999999, beyond 999,999 classes"):
        data.load(str(tmp_path))
