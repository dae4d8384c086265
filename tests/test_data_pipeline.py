"""The grain pipeline: batches, eval coverage, sharding, determinism, exact resume, workers, unusable images."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from flaxvision import Preprocessing
from flaxvision.data import AugmentConfig, device_preprocess, load, make_loader
from flaxvision.data.synthetic import write_image_folder
from flaxvision.data.transforms import decode_eval
from flaxvision.errors import FlaxvisionError

PRE = Preprocessing(img_size=24)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_image_folder(root, num_classes=3, per_split={"train": 10, "validation": 3}, max_side=48, min_side=32)
    return load(str(root))


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A folder with 12 good images and 4 unusable ones (zero bytes, truncated, garbage, a bomb header)."""
    root = tmp_path_factory.mktemp("broken")
    write_image_folder(root, num_classes=2, per_split={"train": 6, "validation": 2}, max_side=40, min_side=32)
    good = (root / "train" / "class_000" / "00000.jpg").read_bytes()
    bomb = Image.new("1", (12_000, 12_000))  # compresses to a few kB: a decompression bomb in miniature
    bomb.save(root / "train" / "class_001" / "bomb.png")
    (root / "train" / "class_000" / "empty.jpg").write_bytes(b"")
    (root / "train" / "class_000" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "train" / "class_001" / "garbage.jpg").write_bytes(os.urandom(500))
    return load(str(root), val_split="train")  # validate on the same files: eval sees the broken ones too


def ids_of(batches):
    return [b["id"].tolist() for b in batches]


def run_epoch(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def test_train_batches_shapes_dtypes_ranges(data):
    loader = make_loader(data.train, preprocessing=PRE, batch_size=8, train=True, seed=0)
    assert len(loader) == 3  # 30 images, drop_remainder
    batches = run_epoch(loader)
    assert len(batches) == 3
    batch = batches[0]
    assert all(type(v) is np.ndarray for v in batch.values())  # host-only: plain numpy, the caller's to keep
    assert batch["image"].dtype == np.uint8
    assert batch["image"].shape == (8, 24, 24, 3) and batch["label"].dtype == np.int32
    assert set(np.concatenate([np.asarray(b["label"]) for b in batches])) <= {0, 1, 2}
    assert np.asarray(batch["mask"]).all()
    pixels = np.asarray(batch["image"])
    assert pixels.max() > 150 and pixels.min() < 100  # real picture content, not blank rows
    ids = np.concatenate(ids_of(batches))
    assert len(set(ids.tolist())) == 24  # no repeats within an epoch
    assert loader.augment == AugmentConfig()  # the record of jitter / flip that the device stage reads
    jitter = {k: getattr(loader.augment, k) for k in ("brightness", "contrast", "saturation")}
    images = jax.device_put(batch["image"])
    x = jax.jit(lambda im, key: device_preprocess(im, PRE.mean, PRE.std, rng=key, **jitter))(images, jax.random.key(0))
    assert x.dtype == np.float32 and -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # mean 0.5, std 0.5


def test_eval_covers_every_example_once_with_a_mask(data):
    loader = make_loader(data.val, preprocessing=PRE, batch_size=4, train=False)
    assert loader.augment is None
    batches = run_epoch(loader)
    assert len(loader) == len(batches) == 3  # 9 examples -> 4 + 4 + 1 (padded to 4)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.tolist() == [True] * 9 + [False] * 3
    ids = np.concatenate(ids_of(batches))[mask]
    assert ids.tolist() == data.val.ids.tolist()  # in order
    expected = decode_eval(data.val[0]["image"], PRE)
    np.testing.assert_array_equal(batches[0]["image"][0], expected)
    assert np.all(batches[-1]["image"][1:] == 0)
    again = run_epoch(loader)  # eval passes are identical
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in again]),
                                  np.concatenate([b["image"] for b in batches]))


def test_eval_shards_split_the_data_evenly(data):
    shards = [make_loader(data.val, preprocessing=PRE, batch_size=2, train=False, shard_index=i, shard_count=2)
              for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3  # ceil(9 / 2) = 5 each, padded: both run the same steps
    seen = [i for loader in shards for b in run_epoch(loader) for i, m in zip(b["id"], b["mask"], strict=True) if m]
    assert sorted(seen) == sorted(data.val.ids.tolist())


def test_train_shards_are_disjoint_and_equal(data):
    shards = [make_loader(data.train, preprocessing=PRE, batch_size=3, train=True, shard_index=i, shard_count=3,
                          seed=4) for i in range(3)]
    epochs = [np.concatenate(ids_of(run_epoch(loader))) for loader in shards]
    assert [len(e) for e in epochs] == [9, 9, 9]
    assert len(set(np.concatenate(epochs).tolist())) == 27


def test_grain_shard_options_and_sharding_over_devices(data, cpu_devices):
    import grain
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    by_options = make_loader(data.train, preprocessing=PRE, batch_size=3, train=True, seed=4,
                             shard_options=grain.sharding.ShardOptions(shard_index=1, shard_count=3))
    by_index = make_loader(data.train, preprocessing=PRE, batch_size=3, train=True, seed=4,
                           shard_index=1, shard_count=3)
    assert ids_of(run_epoch(by_options)) == ids_of(run_epoch(by_index))

    # Laying a host batch out over the devices is the caller's (the device stage's) job; the loader's rows fit it.
    sharding = NamedSharding(Mesh(np.asarray(cpu_devices), ("data",)), PartitionSpec("data"))
    loader = make_loader(data.train, preprocessing=PRE, batch_size=8, train=True)
    host = next(iter(loader))
    image = jax.make_array_from_process_local_data(sharding, host["image"])
    assert image.sharding == sharding and image.shape == (8, 24, 24, 3)
    assert len({shard.device for shard in image.addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(image), host["image"])


def test_same_seed_same_batches_other_seed_other_batches(data):
    def epochs(seed):
        loader = make_loader(data.train, preprocessing=PRE, batch_size=8, train=True, seed=seed)
        return [run_epoch(loader) for _ in range(2)]

    first, second, other = epochs(7), epochs(7), epochs(8)
    for a, b in zip(first[0] + first[1], second[0] + second[1], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert ids_of(first[0]) != ids_of(other[0])
    assert ids_of(first[0]) != ids_of(first[1])  # every epoch is reshuffled...
    augmented = {}  # ...and augmented afresh: the same image comes out differently in epoch 0 and epoch 1
    for epoch in first:
        for batch in epoch:
            for example_id, image in zip(batch["id"].tolist(), batch["image"], strict=True):
                augmented.setdefault(example_id, []).append(image)
    assert all(not np.array_equal(*images) for images in augmented.values() if len(images) == 2)


def test_resume_mid_epoch_gives_the_identical_remaining_batches(data):
    def fresh():
        return make_loader(data.train, preprocessing=PRE, batch_size=4, train=True, seed=3)

    reference = fresh()
    run_epoch(reference, 0)
    expected = run_epoch(reference, 1)  # epoch 1: 7 batches

    interrupted = fresh()
    interrupted.set_epoch(1)
    iterator = iter(interrupted)
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # it travels through a JSON checkpoint
    assert (state["epoch"], state["batch"]) == (1, 3)
    interrupted.close()

    resumed = fresh()
    resumed.set_epoch(1)
    iterator = iter(resumed)
    iterator.set_state(state)
    rest = list(iterator)
    assert len(rest) == 4
    for a, b in zip(rest, expected[3:], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["id"], b["id"])

    other = make_loader(data.train, preprocessing=PRE, batch_size=5, train=True, seed=3)
    with pytest.raises(FlaxvisionError, match="global_batch_size=4, this loader has global_batch_size=5"):
        iter(other).set_state(state)


def test_endless_stream_resumes_across_epochs(data):
    loader = make_loader(data.train, preprocessing=PRE, batch_size=8, train=True, num_epochs=None)
    iterator = iter(loader)
    stream = [next(iterator) for _ in range(8)]  # 3 batches per epoch: crosses two epoch boundaries
    resumed = make_loader(data.train, preprocessing=PRE, batch_size=8, train=True, num_epochs=None)
    it = iter(resumed)
    it.set_state({**iterator.get_state(), "epoch": 1, "batch": 1})
    assert ids_of([next(it) for _ in range(4)]) == ids_of(stream[4:8])


def test_workers_give_the_same_batches_as_in_process(data):
    def two_epochs(workers):
        loader = make_loader(data.train, preprocessing=PRE, batch_size=4, train=True, seed=1, workers=workers)
        try:
            return run_epoch(loader) + run_epoch(loader)
        finally:
            loader.close()

    in_process, with_workers = two_epochs(0), two_epochs(2)
    assert len(in_process) == len(with_workers) == 14
    assert all(type(v) is np.ndarray for b in with_workers for v in b.values())  # copied out of shared memory
    for a, b in zip(in_process, with_workers, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["id"], b["id"])


def test_unusable_images_are_replaced_counted_and_reported(broken, tmp_path, caplog):
    unusable = {"empty.jpg", "truncated.jpg", "garbage.jpg", "bomb.png"}
    loader = make_loader(broken.train, preprocessing=PRE, batch_size=4, train=True)
    with caplog.at_level(logging.WARNING, logger="flaxvision.data"):
        batches = run_epoch(loader)
    assert len(batches) == 4 and all(b["mask"].all() for b in batches)  # replaced by usable images
    skipped = loader.skipped.epochs[0]
    assert sorted(os.path.basename(broken.train.describe(i).split()[-1]) for i in skipped) == sorted(unusable)
    assert loader.skipped.count == 4
    assert not set(skipped) & set(np.concatenate(ids_of(batches)).tolist())
    assert "epoch 0: skipped 4 unusable image(s)" in caplog.text

    report = json.loads(loader.write_report(tmp_path).read_text())
    assert report["count"] == 4 and len(report["epochs"]["0"]) == 4
    reasons = " ".join(entry["reason"] for entry in report["epochs"]["0"])
    assert "empty" in reasons and "too large" in reasons and "cannot decode" in reasons

    evaluation = make_loader(broken.val, preprocessing=PRE, batch_size=4, train=False)
    batches = run_epoch(evaluation)
    assert sum(int(b["mask"].sum()) for b in batches) == len(broken.val) - 4  # the rest, each exactly once
    assert sorted(evaluation.skipped.ids) == sorted(skipped)


def test_padding_instead_of_dropping_and_one_channel_models(data):
    gray = Preprocessing(img_size=16, mean=(0.5,), std=(0.5,))
    loader = make_loader(data.train, preprocessing=gray, batch_size=7, train=True, drop_remainder=False,
                         augment=AugmentConfig.cifar())
    batches = run_epoch(loader)
    assert len(batches) == len(loader) == 5 and batches[0]["image"].shape == (7, 16, 16, 1)
    assert [int(b["mask"].sum()) for b in batches] == [7, 7, 7, 7, 2]


def test_bad_arguments(data):
    with pytest.raises(FlaxvisionError, match="batch_size must be >= 1"):
        make_loader(data.train, preprocessing=PRE, batch_size=0, train=True)
    with pytest.raises(FlaxvisionError, match="make no full batch of 64"):
        make_loader(data.train, preprocessing=PRE, batch_size=64, train=True)
    with pytest.raises(FlaxvisionError, match="shard_index must be in"):
        make_loader(data.train, preprocessing=PRE, batch_size=4, train=True, shard_index=2, shard_count=2)
    with pytest.raises(TypeError, match="to_device"):  # the loader is host-only: data.device.DeviceStage puts batches
        make_loader(data.train, preprocessing=PRE, batch_size=4, train=True, to_device=True)  # type: ignore[call-arg]
    default = make_loader(data.train, preprocessing=PRE, batch_size=4, train=True)
    assert (default.shard_index, default.shard_count) == (0, 1)  # callers pass jax.process_index() themselves


SCRIPT = textwrap.dedent("""
    import dataclasses, os, sys
    import jax  # imported, as a training script would; workers must still never bring up a backend
    from flaxvision import Preprocessing
    from flaxvision.data import ImageSource, load, make_loader

    @dataclasses.dataclass(frozen=True, eq=False)
    class Spy(ImageSource):
        log: str = ""
        def __getitem__(self, index):
            from jax._src import xla_bridge
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {bool(xla_bridge._backends)} {jax.config.jax_platforms}\\n")
            return super().__getitem__(index)

    if __name__ == "__main__":
        data = load(sys.argv[1])
        source = Spy(**{f.name: getattr(data.train, f.name) for f in dataclasses.fields(ImageSource)}, log=sys.argv[2])
        loader = make_loader(source, preprocessing=Preprocessing(img_size=16), batch_size=4, train=True,
                             workers=1)
        batches = list(loader)
        loader.close()
        print("batches", len(batches), "main", os.getpid())
""")


def test_workers_from_a_plain_script_never_touch_an_accelerator(data, tmp_path):
    script, log = tmp_path / "train.py", tmp_path / "worker.log"
    script.write_text(SCRIPT)
    root = data.train.images.root
    env = {**os.environ, "JAX_PLATFORMS": ""}
    done = subprocess.run([sys.executable, str(script), root, str(log)], capture_output=True, text=True, env=env,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    words = done.stdout.split()
    assert words[:2] == ["batches", "7"]
    main_pid = words[-1]
    lines = [line.split() for line in log.read_text().splitlines()]
    assert len(lines) >= 28
    assert {pid for pid, _, _ in lines} != {main_pid} and main_pid not in {pid for pid, _, _ in lines}
    assert {(initialised, platforms) for _, initialised, platforms in lines} == {("False", "cpu")}


LEAK_SCRIPT = textwrap.dedent("""
    import sys
    from flaxvision import Preprocessing
    from flaxvision.data import load, make_loader

    if __name__ == "__main__":
        data = load(sys.argv[1])
        pre = Preprocessing(img_size=16)
        train = make_loader(data.train, preprocessing=pre, batch_size=4, train=True, workers=2)
        val = make_loader(data.val, preprocessing=pre, batch_size=4, train=False, workers=2)
        kept = [next(iter(train))]  # a batch the script still holds at exit
        for loader in (train, val):
            for batch in loader:
                pass
        if sys.argv[2] == "close":
            with train, val:  # closing explicitly (and twice) works too
                pass
            train.close()
        print("ok", len(kept))  # the workers are still running here unless closed: exit must stop them
""")


@pytest.mark.parametrize("how", ["left-running", "close"])
def test_no_leaked_shared_memory_at_exit_with_workers(data, tmp_path, how):
    script = tmp_path / "leak.py"
    script.write_text(LEAK_SCRIPT)
    done = subprocess.run([sys.executable, str(script), data.train.images.root, how], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.split() == ["ok", "1"], done.stderr[-2000:]
    assert "leaked shared_memory" not in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
