"""The small-model fast path: in-memory data with crops on the device, K steps per call, and honest clocks."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxvision
from flaxvision import data
from flaxvision.data import in_memory
from flaxvision.data.device_geometry import DeviceGeometry, pad_crop, random_resized_crop
from flaxvision.data.synthetic import write_image_folder
from flaxvision.errors import ConfigError
from flaxvision.train import TrainConfig, fit
from flaxvision.train.dispatch import StepGroups
from flaxvision.train.rundir import RunDirectory
from flaxvision.train.trainer import auto_steps_per_dispatch
from tests.helpers import CLASS_NAMES, batches, colour_data, flat_params, metrics_records, small_config, tiny_vit


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast") / "images"
    return write_image_folder(root, num_classes=3, per_split={"train": 14, "validation": 5}, max_side=16, min_side=12)


def _drain(iterator):
    return [{k: np.asarray(v) for k, v in b.items() if k in ("image", "label", "mask", "id")} for b in iterator]


def test_in_memory_batches_equal_the_streaming_loaders_without_random_geometry(folder):
    splits = data.load(str(folder))
    model = flaxvision.create_model("cnn", num_classes=3, img_size=16, in_chans=3)
    pre = model.preprocessing
    for train, augment in ((True, data.AugmentConfig.none()), (False, None)):
        for shard in range(2):
            source = splits.train if train else splits.val
            common: dict = dict(preprocessing=pre, batch_size=4, train=train, seed=3, augment=augment, shard_index=shard,
                          shard_count=2)  # fmt: skip
            stream = data.make_loader(source, **common)
            memory = in_memory.load(source, **common, progress=False)
            assert len(stream) == len(memory)
            for epoch in (0, 1):
                stream.set_epoch(epoch)
                memory.set_epoch(epoch)
                a, b = _drain(iter(stream)), _drain(iter(memory))
                assert len(a) == len(b) > 0
                for x, y in zip(a, b, strict=True):
                    for key in x:
                        np.testing.assert_array_equal(x[key], y[key], err_msg=f"train={train} shard={shard} {key}")
            stream.close()


def test_in_memory_iterator_state_resumes_mid_epoch_and_refuses_other_data(folder):
    splits = data.load(str(folder))
    pre = flaxvision.create_model("cnn", num_classes=3, img_size=16, in_chans=3).preprocessing
    loader = in_memory.load(splits.train, preprocessing=pre, batch_size=4, train=True, seed=1, progress=False)
    loader.set_epoch(2)
    it = iter(loader)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = _drain(it)
    again = iter(loader)
    again.set_state(state)
    for x, y in zip(rest, _drain(again), strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    other = in_memory.load(splits.train, preprocessing=pre, batch_size=2, train=True, seed=1, progress=False)
    with pytest.raises(flaxvision.FlaxvisionError, match="global_batch_size=4"):
        iter(other).set_state(state)


def test_pad_crop_windows_and_flip():
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(6, 8, 8, 2)), jnp.float32)
    out = np.asarray(pad_crop(x, 2, jax.random.key(0)))
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(6):  # each output is one 8 x 8 window of its own padded image
        windows = [(t, c) for t in range(5) for c in range(5) if np.array_equal(padded[i, t:t + 8, c:c + 8], out[i])]
        assert windows, f"image {i} is no window of its padded image"
    flipped = np.asarray(DeviceGeometry(hflip=True)(x, jax.random.key(1)))
    same = [np.array_equal(flipped[i], x[i]) for i in range(6)]
    mirrored = [np.array_equal(flipped[i], np.asarray(x)[i, :, ::-1]) for i in range(6)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(mirrored)


def test_random_resized_crop_cuts_a_box_and_scales_it_up():
    ramp = jnp.broadcast_to(jnp.arange(16, dtype=jnp.float32)[None, None, :, None], (8, 16, 16, 1))
    whole = random_resized_crop(ramp, (1.0, 1.0), (1.0, 1.0), jax.random.key(0))
    np.testing.assert_allclose(np.asarray(whole), np.asarray(ramp), atol=1e-4)  # the whole image: unchanged
    quarter = np.asarray(random_resized_crop(ramp, (0.25, 0.25), (1.0, 1.0), jax.random.key(1)))[..., 0]
    spans = quarter[:, :, -1] - quarter[:, :, 0]  # a crop half as wide, stretched: the ramp climbs ~8, not ~15
    assert np.all(np.abs(spans - 7.5) < 1.0), spans[:, 0]
    assert np.all(np.diff(quarter, axis=-1) >= -1e-5)  # still increasing left to right (no flip here)


def test_step_groups_stop_at_every_boundary():
    items = [({"label": np.full(2, i)}, i) for i in range(11)]
    groups = list(StepGroups(items, 4, step=1, periods=[5], marks=[7]))
    assert [t for _, t in groups] == [[0, 1, 2, 3], [4], [5], [6], [7], [8], [9], [10]]  # steps 1-5, then no
    assert [stacked for (_, stacked), _ in groups] == [True] + [False] * 7  # room for 4 before a boundary: singles
    assert groups[0][0][0]["label"].shape == (4, 2) and groups[1][0][0]["label"].shape == (2,)
    aligned = list(StepGroups(items[:10], 5, step=0, periods=[5]))
    assert [t for _, t in aligned] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    single = list(StepGroups(items[:3], 1, step=0))
    assert [s for (_, s), _ in single] == [False] * 3 and [t for _, t in single] == [[0], [1], [2]]


def test_auto_steps_per_dispatch_groups_small_models_on_accelerators_only():
    from types import SimpleNamespace

    from flaxvision.models.registry import model_config

    config = TrainConfig(model="cnn", batch_size=32, log_every=10)
    cnn = SimpleNamespace(config=model_config("cnn"))
    assert auto_steps_per_dispatch(cnn, config, 1, platform="cpu") == 1  # no gain measured on the CPU
    for log_every in (10, 8, 7):
        k = auto_steps_per_dispatch(cnn, config.replace(log_every=log_every), 1, platform="gpu")
        assert (k > 1 or log_every == 7) and log_every % k == 0, (log_every, k)  # groups line up with the metric reads
    vit_b = SimpleNamespace(config=model_config("vit_base_patch16_224"))
    assert auto_steps_per_dispatch(vit_b, config.replace(batch_size=8), 1, platform="gpu") == 1  # ~100 GFLOP a step


def _colour_fit(tmp_path, name, **kw):
    xt, yt = colour_data(128, 0)
    xv, yv = colour_data(32, 1)
    config = small_config(epochs=2, log_every=5, checkpoint_every=None, eval_every=6, **kw)
    return fit(config, run_dir=tmp_path / name, model=tiny_vit(), train_data=batches(xt, yt, 32),
               val_data=batches(xv, yv, 16), class_names=CLASS_NAMES)  # fmt: skip


def test_k_steps_per_call_give_the_same_run_as_one(tmp_path):
    one = _colour_fit(tmp_path, "one", steps_per_dispatch=1)
    three = _colour_fit(tmp_path, "three", steps_per_dispatch=3)
    assert three.trainer is not None and three.trainer.steps_per_dispatch == 3 and three.summary["steps"] == one.summary["steps"] == 8
    a, b = flat_params(one.model), flat_params(three.model)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # bitwise on CPU
    drop = ("images_per_second", "train_seconds", "input_wait_share", "peak_memory_bytes")
    strip = lambda records: [{k: v for k, v in r.items() if k not in drop} for r in records]  # noqa: E731
    assert strip(metrics_records(tmp_path / "one")) == strip(metrics_records(tmp_path / "three"))


def test_epoch_records_hold_synchronized_throughput_input_share_and_memory(tmp_path):
    result = _colour_fit(tmp_path, "rec", steps_per_dispatch=1)
    records = [json.loads(line) for line in (tmp_path / "rec" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [4, 8]
    # Epoch 2 evaluates mid-epoch (eval_every 6): its rate still covers all of its training time. Epoch 1's first
    # step (compilation) is not timed.
    assert [round(r["images_per_second"] * r["train_seconds"]) for r in epochs] == [3 * 32, 4 * 32]
    for r in epochs:
        assert 0.0 <= r["input_wait_share"] <= 1.0 and r["peak_memory_bytes"] > 0
        assert r["peak_memory_of"] in ("device", "process_rss")
    s = result.summary
    assert 0 < s["compile_seconds"] <= s["first_step_seconds"] <= s["wall_seconds"]


def test_throughput_counts_steps_that_have_run_not_that_are_queued(tmp_path):
    """A step made slow on purpose: a clock read while steps are still queued would report far more images/s."""

    def slow(images, key):
        m = jnp.full((256, 256), 1e-3, jnp.float32)
        burn = jax.lax.fori_loop(0, 24, lambda i, a: jnp.tanh(a @ m), m)
        return images.astype(jnp.float32) / 255.0 + 1e-30 * jnp.sum(burn)

    xt, yt = colour_data(256, 0)
    config = small_config(epochs=1, log_every=100, checkpoint_every=None, steps_per_dispatch=1)
    result = fit(config, run_dir=tmp_path / "slow", model=tiny_vit(), train_data=batches(xt, yt, 32), val_data=None,
                 class_names=CLASS_NAMES, preprocess=slow)  # fmt: skip
    trainer = result.trainer
    assert trainer is not None
    batch = trainer.stage.put({"image": xt[:32], "label": yt[:32]})
    times = []
    for _ in range(3):
        start = time.perf_counter()
        trainer.state = trainer.train_step(trainer.state, batch)
        jax.block_until_ready(trainer.state)
        times.append(time.perf_counter() - start)
    timed_steps = 8 - 1  # the first step (compilation) is not counted
    seconds = result.summary["steps"] and timed_steps * 32 / result.summary["train_images_per_second"]
    assert seconds >= 0.6 * timed_steps * min(times), (seconds, times)


def test_profile_writes_a_trace_of_the_chosen_steps(tmp_path, capsys):
    _colour_fit(tmp_path, "prof", steps_per_dispatch=2, profile="2:3")
    out = capsys.readouterr().out
    assert "profile of steps 3-5 written to" in out
    traces = list((tmp_path / "prof" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert list((tmp_path / "prof" / "profile").rglob("perfetto_trace.json.gz"))


def test_in_memory_choices(folder, capsys):
    splits = data.load(str(folder))
    model = flaxvision.create_model("cnn", num_classes=3, img_size=16, in_chans=3)
    from flaxvision.train.recipe import in_memory_reason, make_loaders

    base = TrainConfig(model="cnn", dataset=str(folder), batch_size=4, augment="cifar")
    assert in_memory_reason(base, model, splits.train, splits.val) is None
    train, _ = make_loaders(base, model, splits.train, splits.val)
    assert isinstance(train, in_memory.InMemoryLoader)
    assert train.device_geometry == DeviceGeometry(crop="pad_crop", pad=4, hflip=True, scale=(0.7, 1.0))
    assert "--in-memory off" == in_memory_reason(base.replace(in_memory="off"), model, splits.train, splits.val)
    assert "RandAugment" in str(in_memory_reason(base.replace(randaugment="rand-m9"), model, splits.train, splits.val))
    with pytest.raises(ConfigError, match="--in-memory on: RandAugment"):
        in_memory_reason(base.replace(randaugment="rand-m9", in_memory="on"), model, splits.train, splits.val)
    tiny = base.replace(in_memory_max_gb=1e-6)
    with pytest.raises(ConfigError, match=r"--in-memory on: the data decodes to 0.0 MB, over --in-memory-max-gb 1e-06"):
        in_memory_reason(tiny.replace(in_memory="on"), model, splits.train, splits.val)
    assert "over --in-memory-max-gb" in str(in_memory_reason(tiny, model, splits.train, splits.val))
    assert "streaming the data from storage" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="in_memory='maybe': use auto, on or off"):
        base.replace(in_memory="maybe")
    with pytest.raises(ConfigError, match="profile='5': use START:COUNT"):
        base.replace(profile="5")


def test_a_run_recorded_before_in_memory_existed_resumes_as_it_ran(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    recipe = TrainConfig(model="cnn").to_dict()
    del recipe["in_memory"]
    (run / "config.json").write_text(json.dumps({"train_config": recipe}))
    assert TrainConfig.from_file(run / "config.json").in_memory == "off"
    directory = RunDirectory(run, is_main=True)
    assert directory.recipe_changes(TrainConfig(model="cnn", in_memory="off")) == {}
    assert "in_memory" in directory.recipe_changes(TrainConfig(model="cnn"))


def test_the_compilation_cache_is_on_by_default_and_off_on_request(tmp_path, monkeypatch):
    import subprocess
    import sys

    from flaxvision import cli, compile_cache

    script = ("from flaxvision import compile_cache; import jax, jax.numpy as jnp; print(compile_cache.configure()); "
              "jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((64, 64))).block_until_ready()")  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    done = subprocess.run([sys.executable, "-c", script], env={**env, "XDG_CACHE_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    where = tmp_path / "flaxvision" / "jax-cache"
    assert done.stdout.strip() == str(where) and any(p.name.endswith("-cache") for p in where.iterdir())

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("FLAXVISION_COMPILE_CACHE", "off")
    assert compile_cache.configure() is None
    monkeypatch.delenv("FLAXVISION_COMPILE_CACHE")
    assert compile_cache.configure(enabled=False) is None
    calls = []
    monkeypatch.setattr(compile_cache, "configure", lambda enabled=True: calls.append(enabled))
    assert cli.main(["evaluate", str(tmp_path / "no-run"), "--no-compile-cache"]) == 2
    assert cli.main(["evaluate", str(tmp_path / "no-run")]) == 2
    assert calls == [False, True]


def test_an_entry_left_without_its_access_time_is_repaired(tmp_path):
    from flaxvision import compile_cache

    (tmp_path / "jit_f-abc-cache").write_bytes(b"x")  # what a process killed between the two writes leaves
    (tmp_path / "jit_g-def-cache").write_bytes(b"y")
    (tmp_path / "jit_g-def-atime").write_bytes((5).to_bytes(8, "little"))
    assert compile_cache.repair_orphans(tmp_path) == 1
    assert int.from_bytes((tmp_path / "jit_f-abc-atime").read_bytes(), "little") == 0
    assert int.from_bytes((tmp_path / "jit_g-def-atime").read_bytes(), "little") == 5


@pytest.mark.parametrize("shape,k,stride,pad", [((3, 2, 2, 16), 3, 1, 1), ((3, 4, 4, 8), 3, 2, 1), ((3, 3, 3, 8), 3, 2, 1),
                                                ((3, 4, 4, 8), 1, 2, 0), ((3, 5, 5, 4), 3, 2, 0), ((2, 6, 6, 4), 3, 1, 1)])  # fmt: skip
def test_tiny_convolutions_as_a_matmul_equal_xla_convolutions(shape, k, stride, pad):
    from jax import lax

    from flaxvision.models.conv import conv_general_dilated

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, shape[-1], 6)), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    args = ((stride, stride), ((pad, pad), (pad, pad)))
    want = lax.conv_general_dilated(x, w, *args, dimension_numbers=dn)
    got = conv_general_dilated(x, w, *args, dimension_numbers=dn)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda w, f=f: jnp.sum(f(x, w, *args, dimension_numbers=dn) ** 2))(w)
             for f in (lax.conv_general_dilated, conv_general_dilated)]  # fmt: skip
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads[0]), rtol=1e-4, atol=1e-4)


def test_a_profile_that_cannot_be_written_is_a_warning_not_a_stopped_run(tmp_path, capsys):
    from flaxvision.train.instrument import StepProfiler

    blocker = tmp_path / "run"
    blocker.write_text("a file where the profile directory would go")
    profiler = StepProfiler("0:2", blocker / "profile", is_main=True, processes=1)
    state = jnp.zeros(3)
    profiler.before(0, state)
    profiler.after(2, state)
    profiler.stop(state)
    assert not profiler.active and "warning: no profile" in capsys.readouterr().out


def test_an_in_memory_run_with_device_crops_resumed_mid_epoch_ends_equal_to_an_uninterrupted_one(tmp_path):
    from flaxvision.train.recipe import make_loaders
    from tests.helpers import straight_and_interrupted

    config = small_config(epochs=2, batch_size=8, eval_batch_size=8, log_every=2, seed=5, augment="cifar")
    loaders = []

    def make(model, splits):
        loaders.append(make_loaders(config, model, splits.train, splits.val))
        return loaders[-1]

    straight, resumed = straight_and_interrupted(tmp_path, config, tiny_vit, make)
    assert all(isinstance(t, in_memory.InMemoryLoader) and t.device_geometry is not None for t, _ in loaders)
    a, b = flat_params(straight.model), flat_params(resumed.model)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert metrics_records(tmp_path / "straight") == metrics_records(tmp_path / "cut")
