"""flaxvision.data.load: every source kind, column detection, class subsets, held-out splits, clear errors."""

import glob
import io
import json
import logging
import os
import shutil

import datasets
import numpy as np
import pytest
from PIL import Image

from flaxvision.data import load, resolve_kind, stratified_split
from flaxvision.data.synthetic import folder_to_disk, write_image_folder
from flaxvision.errors import FlaxvisionError

CLASSES = [f"class_{i:03d}" for i in range(4)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    return write_image_folder(root, num_classes=4, per_split={"train": 6, "validation": 2}, max_side=40, min_side=24)


@pytest.fixture(scope="module")
def disk(folder, tmp_path_factory):
    return folder_to_disk(folder, tmp_path_factory.mktemp("disk") / "ds")


def _splits(path) -> datasets.DatasetDict:
    splits = datasets.load_from_disk(str(path))
    assert isinstance(splits, datasets.DatasetDict)
    return splits


def _png(color, mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, (12, 10), color).save(buffer, "PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def test_resolve_kind(folder, disk, tmp_path):
    assert resolve_kind(str(folder)) == "folder"
    assert resolve_kind(str(disk)) == "disk"
    _splits(disk)["train"].to_parquet(str(tmp_path / "train.parquet"))
    assert resolve_kind(str(tmp_path / "train.parquet")) == "parquet"
    assert resolve_kind(str(tmp_path)) == "parquet"
    for hub_id in ("ethz/food101", "uoft-cs/cifar10", "ylecun/mnist", "cifar10"):
        assert resolve_kind(hub_id) == "hub"
    for bad in ("./no/such/dir", "/no/such/path", "a/b/c"):
        with pytest.raises(FlaxvisionError, match="does not exist"):
            resolve_kind(bad)


def test_image_folder(folder):
    data = load(str(folder))
    assert data.class_names == tuple(CLASSES)
    assert (len(data.train), len(data.val)) == (24, 8)
    assert not data.val_held_out and data.num_channels == 3
    assert np.bincount(data.train.labels).tolist() == [6, 6, 6, 6]
    record = data.train[0]
    assert os.path.isfile(record["image"]) and record["label"] == 0
    assert "class_000" in data.train.describe(record["id"])


def test_image_folder_without_splits_gets_stratified_held_out(tmp_path):
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(10):
            Image.new("RGB", (8, 8), (c * 80, i, 0)).save(tmp_path / f"c{c}" / f"{i}.png")
    data = load(str(tmp_path), val_fraction=0.2, seed=3)
    assert data.val_held_out and data.class_names == ("c0", "c1", "c2")
    assert np.bincount(data.val.labels).tolist() == [2, 2, 2]
    assert np.bincount(data.train.labels).tolist() == [8, 8, 8]
    assert not set(data.train.ids) & set(data.val.ids)
    again = load(str(tmp_path), val_fraction=0.2, seed=3)
    other = load(str(tmp_path), val_fraction=0.2, seed=4)
    assert np.array_equal(again.val.ids, data.val.ids)
    assert not np.array_equal(other.val.ids, data.val.ids)


def test_stratified_split_properties():
    labels = np.repeat(np.arange(5), [10, 20, 30, 1, 4])
    train, held = stratified_split(labels, 0.25, seed=0)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(labels)))
    counts = np.bincount(labels[held], minlength=5).tolist()
    assert counts == [2, 5, 8, 0, 1]  # round(0.25 n), at least 1, never a whole class, none from a singleton
    assert np.array_equal(held, stratified_split(labels, 0.25, seed=0)[1])


def test_save_to_disk_dir(disk):
    data = load(str(disk))
    assert data.class_names == tuple(CLASSES)
    assert (len(data.train), len(data.val)) == (24, 8)
    record = data.train[5]
    assert isinstance(record["image"], bytes) and record["image"][:2] == b"\xff\xd8"  # raw JPEG bytes, undecoded
    assert data.train.describe(record["id"]).endswith("[train] row 5 (00005.jpg)")  # with the Image struct's path


def test_parquet_file_and_directory(disk, tmp_path):
    ds = _splits(disk)
    single = tmp_path / "one" / "food.parquet"
    single.parent.mkdir()
    ds["train"].to_parquet(str(single))
    data = load(str(single), cache_dir=str(tmp_path / "cache"))
    assert data.class_names == tuple(CLASSES) and data.val_held_out  # ClassLabel kept in the parquet metadata
    assert len(data.train) + len(data.val) == 24
    second = tmp_path / "one" / "more.parquet"
    ds["validation"].to_parquet(str(second))
    both = load(f"{single},{second}", cache_dir=str(tmp_path / "cache"))  # a list of files: one training split
    assert len(both.train) + len(both.val) == 32
    directory = tmp_path / "dir"
    directory.mkdir()
    ds["train"].to_parquet(str(directory / "train-00000-of-00001.parquet"))
    ds["validation"].to_parquet(str(directory / "validation-00000-of-00001.parquet"))
    data = load(str(directory), cache_dir=str(tmp_path / "cache"))
    assert (len(data.train), len(data.val)) == (24, 8) and not data.val_held_out
    assert isinstance(data.train[0]["image"], bytes)


def test_columns_detected_or_named(tmp_path):
    features = datasets.Features({
        "img": datasets.Image(), "coarse": datasets.Value("int64"), "fine_label": datasets.ClassLabel(names=["x", "y"]),
    })
    rows = {"img": [_png((255, 0, 0)), _png((0, 0, 255))] * 4, "coarse": [0] * 8, "fine_label": [0, 1] * 4}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "d"))
    data = load(str(tmp_path / "d"))
    assert data.class_names == ("x", "y")
    assert np.array_equal(data.train.labels, np.asarray([0, 1] * 4)[data.train.ids])
    with pytest.raises(FlaxvisionError, match=r"has only one class \('0'\); a classifier needs at least two"):
        load(str(tmp_path / "d"), label_column="coarse")  # the column is found; all its labels are 0
    with pytest.raises(FlaxvisionError, match="no label column 'fine'.*did you mean fine_label"):
        load(str(tmp_path / "d"), label_column="fine")


def test_string_labels_become_classes(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    rows = {"image": [_png((9, 9, 9))] * 6, "label": ["ramen", "apple_pie", "ramen"] * 2}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "d"))
    data = load(str(tmp_path / "d"), val_fraction=0.5)
    assert data.class_names == ("apple_pie", "ramen")


def test_class_subsets_remap_labels_and_keep_names(disk):
    first = load(str(disk), classes=2)
    assert first.class_names == ("class_000", "class_001")
    assert set(first.train.labels) == {0, 1} and len(first.train) == 12 and len(first.val) == 4
    named = load(str(disk), classes=["class_003", "class_001"])
    assert named.class_names == ("class_003", "class_001")
    full = load(str(disk))
    original = dict(zip(full.train.ids.tolist(), full.train.labels.tolist(), strict=True))
    for example_id, label in zip(named.train.ids.tolist(), named.train.labels.tolist(), strict=True):
        assert original[example_id] == (3, 1)[label]
    assert load(str(disk), classes="class_002,class_000").class_names == ("class_002", "class_000")
    with pytest.raises(FlaxvisionError, match="no class 'class_9'"):
        load(str(disk), classes=["class_9"])
    with pytest.raises(FlaxvisionError, match="classes=7 but dataset"):
        load(str(disk), classes=7)


def test_sample_caps(disk):
    data = load(str(disk), max_train_samples=5, max_val_samples=3, seed=1)
    assert (len(data.train), len(data.val)) == (5, 3)
    assert np.array_equal(load(str(disk), max_train_samples=5, seed=1).train.ids, data.train.ids)


def test_split_selection_and_errors(disk):
    data = load(str(disk), train_split="validation", val_split="train")
    assert (len(data.train), len(data.val)) == (8, 24)
    with pytest.raises(FlaxvisionError, match="no split 'validaton' \\(did you mean validation\\?\\); splits: train"):
        load(str(disk), val_split="validaton")
    with pytest.raises(FlaxvisionError, match="no split 'trian'"):
        load(str(disk), train_split="trian")


def test_label_outside_class_list_is_an_error(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    table = datasets.Dataset.from_dict({"image": [_png((1, 2, 3))] * 3, "label": [0, 1, 1]}, features=features)
    table = table.cast_column("label", datasets.Value("int64")).map(lambda r, i: {"label": -1 if i == 2 else r["label"]},
                                                                    with_indices=True)
    table = table.cast_column("label", datasets.ClassLabel(names=["a", "b"]))
    table.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(FlaxvisionError, match="label -1 at row 2, outside the 2 classes"):
        load(str(tmp_path / "d"))


def test_an_unlabeled_test_split_is_not_the_default_validation_split(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    train = datasets.Dataset.from_dict({"image": [_png((1, 2, 3))] * 8, "label": [0, 1] * 4}, features=features)
    test = datasets.Dataset.from_dict({"image": [_png((1, 2, 3))] * 2, "label": [-1, -1]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "d"))
    data = load(str(tmp_path / "d"), val_fraction=0.25)
    assert data.val_held_out and (len(data.train), len(data.val)) == (6, 2)
    with pytest.raises(FlaxvisionError, match="unlabeled splits"):
        load(str(tmp_path / "d"), val_split="test")


def test_no_usable_images_is_an_error(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "train" / c / f"{i}.jpg").write_bytes(b"not an image at all")
    with pytest.raises(FlaxvisionError, match="none of the .* images checked could be read"):
        load(str(tmp_path))
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(FlaxvisionError, match="empty/x holds no images"):
        load(str(tmp_path / "empty"))


def test_grayscale_dataset_has_one_channel(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["0", "1"])})
    rows = {"image": [_png(v, "L") for v in (0, 255)] * 4, "label": [0, 1] * 4}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "mnist"))
    assert load(str(tmp_path / "mnist")).num_channels == 1


def test_hub_id_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FlaxvisionError) as err:
        load("someone/not-cached-anywhere", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "'someone/not-cached-anywhere' is not in the local cache" in message and "\n" not in message
    assert "HF_HUB_OFFLINE" in message
    assert isinstance(err.value.__cause__, ConnectionError)  # raised by datasets.load_dataset, which was called


def test_hub_id_loads_from_the_datasets_cache_offline(tmp_path, monkeypatch):
    """A Hub id goes to datasets.load_dataset, which (offline) finds the dataset in its cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    rows = {"img": [_png((200, 0, 0)), _png((0, 200, 0))] * 5, "label": [0, 1] * 5}
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"{split}.parquet"))
    files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "test")}
    datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "build"))
    built = next(p for p in glob.glob(str(tmp_path / "build" / "parquet" / "*" / "0.0.0" / "*")) if os.path.isdir(p))
    # Lay the prepared Arrow files out the way a download of "someone/pets" leaves them in the cache.
    cached = tmp_path / "cache" / "someone___pets" / "default" / "0.0.0" / "0123abcd"
    cached.mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copy(os.path.join(built, f"parquet-{split}.arrow"), cached / f"pets-{split}.arrow")
    with open(os.path.join(built, "dataset_info.json")) as f:  # closed: an unclosed file is a ResourceWarning
        info = json.load(f)
    info.update(config_name="default", dataset_name="pets")
    (cached / "dataset_info.json").write_text(json.dumps(info))

    data = load("someone/pets", cache_dir=str(tmp_path / "cache"))
    assert data.class_names == ("cat", "dog") and not data.val_held_out  # "test" serves as validation
    assert (len(data.train), len(data.val)) == (10, 10)
    assert isinstance(data.train[0]["image"], bytes)


def _images(directory, count, color=(90, 30, 200), suffix=".png"):
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (color[0], i * 20, color[2])).save(directory / f"{i}{suffix}")


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    _images(tmp_path / "train" / "dog", 3)
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    _images(tmp_path / "val" / "dog", 1)
    with pytest.raises(FlaxvisionError) as err:
        load(str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"{tmp_path}/train/cat holds no images (suffixes ")
    assert ".jpg" in message and ".png" in message and message.endswith("remove the folder or add images")


def test_a_single_class_training_split_is_an_error_naming_the_class(tmp_path):
    _images(tmp_path / "train" / "cat", 4)
    _images(tmp_path / "val" / "cat", 2)
    with pytest.raises(FlaxvisionError, match=r"\[train\] has only one class \('cat'\); a classifier needs at least two"):
        load(str(tmp_path))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    rows = {"image": [_png((1, 2, 3))] * 4, "label": [1] * 4}  # two names, but only "dog" has examples
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(FlaxvisionError, match=r"has only one class \('dog'\)"):
        load(str(tmp_path / "d"), val_fraction=0.5)
    two = tmp_path / "two"
    _images(two / "cat", 2)
    _images(two / "dog", 2)
    with pytest.raises(FlaxvisionError, match=r"has only one class \('cat'\)"):
        load(str(two), classes=["cat"])  # a subset of one class is the same mistake


def test_a_class_missing_from_validation_is_a_warning_naming_it(tmp_path, caplog):
    for name in ("cat", "dog", "emu"):
        _images(tmp_path / "train" / name, 3)
    for name in ("cat", "dog"):
        _images(tmp_path / "val" / name, 1)
    with caplog.at_level(logging.WARNING, logger="flaxvision.data"):
        data = load(str(tmp_path))
    assert data.class_names == ("cat", "dog", "emu") and len(data.val) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "[validation] has no example of class(es) 'emu'" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flaxvision.data"):
        load(str(tmp_path), classes=["cat", "dog"])
    assert not caplog.records


def test_image_suffixes_are_one_constant_for_folders_and_predict(tmp_path):
    from flaxvision.commands import predict
    from flaxvision.data import IMAGE_SUFFIXES

    assert {".jpg", ".jpeg", ".png", ".webp", ".tga"} <= IMAGE_SUFFIXES
    _images(tmp_path / "a", 2, suffix=".tga")
    _images(tmp_path / "b", 2, suffix=".jpeg")
    (tmp_path / "a" / "readme.txt").write_text("skipped by both")
    data = load(str(tmp_path), val_fraction=0.5)
    found = sorted(os.path.basename(data.train.describe(i)) for i in np.concatenate([data.train.ids, data.val.ids]))
    assert found == sorted(p.name for p in predict._expand([str(tmp_path)])) == ["0.jpeg", "0.tga", "1.jpeg", "1.tga"]
