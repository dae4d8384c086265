"""On-device preprocessing: exact normalisation, jitter ranges and determinism, flips, inside jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvision.data import DevicePreprocess, device_preprocess

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(60, 196, (16, 8, 8, 3), dtype=np.uint8)  # mid-range: jitter never clips


def test_normalisation_is_exact(images):
    out = jax.jit(lambda x: device_preprocess(x, MEAN, STD))(images)
    expected = (images / 255.0 - np.array(MEAN)) / np.array(STD)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    assert device_preprocess(images, MEAN, STD, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_without_a_key_nothing_random_happens(images):
    jittery = DevicePreprocess(MEAN, STD, 0.2, 0.2, 0.2, hflip=True)
    np.testing.assert_array_equal(np.asarray(jittery(images)), np.asarray(device_preprocess(images, MEAN, STD)))


def test_jitter_is_deterministic_per_key_and_within_range(images):
    jittery = jax.jit(DevicePreprocess((0.0,) * 3, (1.0,) * 3, brightness=0.2))
    a, b = jittery(images, jax.random.key(1)), jittery(images, jax.random.key(1))
    c = jittery(images, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    factors = np.asarray(a) / (images / 255.0)  # brightness: one factor per image
    per_image = factors.reshape(len(images), -1)
    np.testing.assert_allclose(per_image, np.broadcast_to(per_image[:, :1], per_image.shape), rtol=1e-4)
    assert per_image.min() >= 0.8 - 1e-5 and per_image.max() <= 1.2 + 1e-5
    assert per_image[:, 0].std() > 0.02


def test_contrast_and_saturation_keep_gray_and_mean_level():
    gray = np.full((4, 6, 6, 3), 120, np.uint8)
    out = DevicePreprocess((0.0,) * 3, (1.0,) * 3, contrast=0.5, saturation=0.5)(gray, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(out), 120 / 255, atol=1e-5)  # a flat gray image has nothing to change
    rng = np.random.default_rng(3)
    colourful = rng.integers(40, 210, (8, 6, 6, 3), dtype=np.uint8)
    out = np.asarray(DevicePreprocess((0.0,) * 3, (1.0,) * 3, contrast=0.3)(colourful, jax.random.key(0)))
    luma = np.array([0.299, 0.587, 0.114])
    before = (colourful / 255.0 @ luma).mean(axis=(1, 2))
    np.testing.assert_allclose((out @ luma).mean(axis=(1, 2)), before, atol=1e-4)  # contrast pivots on the mean


def test_one_channel_images():
    x = np.full((2, 4, 4, 1), 51, np.uint8)
    out = device_preprocess(x, (0.2,), (0.5,), rng=jax.random.key(0), saturation=0.3, contrast=0.3)
    np.testing.assert_allclose(np.asarray(out), 0.0, atol=1e-5)  # (0.2 - 0.2) / 0.5: flat image unchanged


def test_device_flip_is_about_half():
    x = np.zeros((400, 2, 2, 1), np.uint8)
    x[:, :, 0] = 255
    out = np.asarray(device_preprocess(x, (0.0,), (1.0,), rng=jax.random.key(5), hflip=True))
    flipped = out[:, 0, 0, 0] == 0
    assert 0.4 < flipped.mean() < 0.6
    assert np.all(out[flipped, 0, 1, 0] == 1.0)


def test_shape_mismatch_is_a_clear_error(images):
    with pytest.raises(ValueError, match="C == len\\(mean\\)"):
        device_preprocess(images, (0.5,), (0.5,))


# ---- DeviceStage: the one owner of transfer, padding, prefetch, normalisation and jitter ---------------------------


def _stage(jitter=None, **kw):
    from flaxvision.data.device import DeviceStage
    from flaxvision.data.transforms import AugmentConfig
    from flaxvision.preprocessing import Preprocessing

    pre = Preprocessing(img_size=8, mean=MEAN, std=STD)
    return DeviceStage(pre, jitter=AugmentConfig(brightness=jitter, contrast=0.0, saturation=0.0) if jitter else None, **kw)


def test_stage_puts_batches_sharded_over_the_data_axis(images, cpu_devices):
    stage = _stage(devices=cpu_devices[:4])
    on_device = stage.put({"image": images, "label": np.arange(16)})
    assert on_device["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(on_device["image"].addressable_shards) == 4 and on_device["image"].addressable_shards[0].data.shape[0] == 4
    np.testing.assert_array_equal(np.asarray(on_device["label"]), np.arange(16))


def test_stage_prefetch_keeps_each_tag_with_its_batch(images):
    stage = _stage(devices=jax.devices()[:1])
    items = [({"image": images[i : i + 4], "label": np.full(4, i)}, f"after {i}") for i in range(0, 16, 4)]
    out = list(stage.prefetch(iter(items), size=2))
    assert [tag for _, tag in out] == ["after 0", "after 4", "after 8", "after 12"]
    assert [int(b["label"][0]) for b, _ in out] == [0, 4, 8, 12]


def test_stage_pads_eval_batches_to_one_shape_with_a_mask(images):
    stage = _stage()
    padded = stage.pad((images[:5], np.arange(5)), 8)  # an (image, label) tuple works too
    assert padded["image"].shape == (8, 8, 8, 3) and padded["mask"].tolist() == [True] * 5 + [False] * 3
    with pytest.raises(ValueError, match="more than the batch size 4"):
        stage.pad({"image": images[:5], "label": np.arange(5)}, 4)


def test_stage_jitters_training_inputs_only(images):
    stage = _stage(jitter=0.4)
    key = jax.random.key(1)
    plain = np.asarray(device_preprocess(images, MEAN, STD))
    np.testing.assert_allclose(np.asarray(jax.jit(stage.eval_inputs)(images)), plain, rtol=0, atol=1e-6)
    jittered = np.asarray(jax.jit(stage.train_inputs)(images, key))
    assert np.abs(jittered - plain).max() > 0.05  # brightness moved the pixels
    floats = np.zeros((2, 8, 8, 3), np.float32) + 0.25  # already-normalised inputs pass through
    np.testing.assert_array_equal(np.asarray(stage.train_inputs(jnp.asarray(floats), key)), floats)


def test_stage_shows_what_the_model_sees_after_jitter(images):
    """The report's 'after augmentation' grid: pixels that, normalised, are the model's training inputs."""
    stage = _stage(jitter=0.4)
    key = jax.random.key(2)
    shown = stage.show(images, key)
    assert shown.dtype == np.uint8 and not np.array_equal(shown, images)
    expected = np.asarray(jax.jit(stage.train_inputs)(images, key))
    np.testing.assert_allclose(np.asarray(device_preprocess(shown, MEAN, STD)), expected, atol=0.02)  # 8-bit rounding
