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
