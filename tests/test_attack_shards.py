"""Hostile input to sharded data: a damaged manifest or index, a lost shard, duplicate keys in a tar, two packs
into one --out at once; each met with one error at open (or a warning that counts what was left out), never a
crash mid-run or a silent loss."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from flaxvision.errors import FlaxvisionError
from tests.helpers import colour_data


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A `flaxvision data pack` directory of an image folder (24 train images in several shards, 8 validation)."""
    from flaxvision.data.pack import pack

    root = tmp_path_factory.mktemp("folder")
    for split, n, seed in (("train", 24, 0), ("val", 8, 1)):
        x, y = colour_data(n, seed)
        for i, (image, label) in enumerate(zip(x, y)):
            d = root / split / ["red", "green", "blue", "grey"][label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(d / f"{i:03d}.png")
    return pack(str(root), tmp_path_factory.mktemp("packed") / "p", shard_size=4096, progress=False)


def _edit_index(path, edit):
    arrays = dict(np.load(path))
    edit(arrays)
    np.savez(path, **arrays)


def _edit_manifest(path, edit):
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


DAMAGE = {  # what is done to a copy of the packed directory, what the one error says
    "a shard lost": (lambda d: (d / "train" / "train-000001.tar").unlink(), "train-000001.tar, which does not exist"),
    "no index": (lambda d: (d / "train" / "index.npz").unlink(), "cannot read its shards or index (FileNotFoundError"),
    "index not a zip": (lambda d: (d / "train" / "index.npz").write_bytes(b"garbage"), "cannot read its shards or index"),
    "index without offsets": (lambda d: _edit_index(d / "train" / "index.npz", lambda a: a.pop("offset")), "'offset"),
    "index shorter": (lambda d: _edit_index(d / "train" / "index.npz", lambda a: a.update({k: v[:5] for k, v in a.items()})),
                      "holds [5] entries, the manifest counts 24"),
    "index names a shard beyond the list": (lambda d: _edit_index(d / "train" / "index.npz", lambda a: a["shard"].__setitem__(0, 99)),
                                            "names shard 99 of"),
    "no class names": (lambda d: _edit_manifest(d / "manifest.json", lambda m: m.pop("class_names")), "no class_names list or splits"),
    "splits a list": (lambda d: _edit_manifest(d / "manifest.json", lambda m: m.update(splits=[])), "no class_names list or splits"),
    "split without index": (lambda d: _edit_manifest(d / "manifest.json", lambda m: m["splits"]["train"].pop("index")),
                            "cannot read its shards or index (KeyError"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_manifest_index_or_lost_shard_is_one_error_at_open(packed, tmp_path, case):
    """Were a KeyError, BadZipFile, IndexError mid-epoch, or (a lost local shard) every one of its images skipped."""
    import shutil

    from flaxvision import data

    damage, message = DAMAGE[case]
    copy = tmp_path / "p"
    shutil.copytree(packed, copy)
    damage(copy)
    with pytest.raises(FlaxvisionError) as err:
        data.load(str(copy))
    assert message in str(err.value) and "\n" not in str(err.value) and "re-run flaxvision data pack" in str(err.value), str(err.value)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _png(image) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_a_tar_key_that_appears_twice_is_left_out_and_counted_not_silently_merged(tmp_path, caplog):
    """001.png/001.cls twice in one tar (a shard appended to) gave one sample with the later image and label and no
    word about the other; now both are left out with a warning naming the member, the rest read as written."""
    from flaxvision import data

    x, _ = colour_data(6, 0)
    members = [("001.png", _png(x[0])), ("001.cls", b"1"), ("001.png", _png(x[1])), ("001.cls", b"0")]
    members += [(f"{i:03d}.{ext}", _png(x[i]) if ext == "png" else str(i % 2).encode()) for i in range(2, 6)
                for ext in ("png", "cls")]  # fmt: skip
    _tar(tmp_path / "train-000000.tar", members)
    with caplog.at_level(logging.WARNING, logger="flaxvision.data"):
        splits = data.load(str(tmp_path / "train-000000.tar"), val_fraction=0.5)
    assert sorted(splits.train.images.keys or []) == ["002", "003", "004", "005"]
    assert any("1 key(s) with a member twice (first 001.png) left out" in r.getMessage() for r in caplog.records)


def test_a_pack_whose_out_another_pack_filled_meanwhile_keeps_the_other_and_says_so(packed, tmp_path):
    """Two `data pack`s into one --out at once: both passed the "--out is empty" check, and the one that finished
    second replaced the first's output without --overwrite."""
    from flaxvision import data, files
    from flaxvision.data.pack import pack

    out = tmp_path / "out"
    with pytest.raises(FlaxvisionError, match="filled by another process meanwhile and is kept as it is"):
        with files.atomic_directory(out) as mine:  # what this pack builds ...
            (mine / "manifest.json").write_text("{}")
            pack(str(packed), out, shard_size=4096, progress=False)  # ... while the other one finishes first
    assert len(data.load(str(out)).train) == 24  # the other pack's output, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and no temporary of this one left


def test_streamed_parquet_without_hub_metadata_reads_and_a_text_label_column_is_one_error(tmp_path):
    """Parquet files that `datasets` did not write (no class names in their metadata) stream with classes "0".."K-1";
    a label column of text was a ValueError traceback from numpy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flaxvision import data

    x, y = colour_data(12, 0)
    images = [{"bytes": _png(image), "path": None} for image in x]
    pq.write_table(pa.table({"image": images, "label": y.astype(np.int64)}), tmp_path / "train-0.parquet", row_group_size=4)
    splits = data.load(str(tmp_path), streaming=True, val_fraction=0.25)
    assert splits.class_names == ("0", "1", "2", "3") and len(splits.train) + len(splits.val) == 12
    pq.write_table(pa.table({"image": images, "label": ["red"] * 12}), tmp_path / "train-1.parquet")
    with pytest.raises(FlaxvisionError, match=r"train-1.parquet: the label column 'label' holds object values, not class"):
        data.load(str(tmp_path), streaming=True)
