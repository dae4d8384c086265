"""Host-side decode + augmentation: odd and broken images, crop/flip statistics, draft decoding, eval geometry."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flaxvision.data.transforms import (
    AugmentConfig,
    BadImage,
    decode_eval,
    decode_train,
    eval_box,
    open_image,
    probe_image,
    random_resized_box,
)
from flaxvision.errors import ConfigError
from flaxvision.preprocessing import Preprocessing


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, and almost no data: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + body + end


EVAL = Preprocessing(img_size=16)


def test_broken_images_raise_bad_image():
    jpeg = encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    cases = {
        "empty": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "garbage": b"\x00\x01garbage" * 50,
        "bomb": png_header_only(100_000, 100_000),
    }
    for data in cases.values():
        with pytest.raises(BadImage):
            decode_eval(data, EVAL)
        with pytest.raises(BadImage):
            probe_image(data)
    with pytest.raises(BadImage, match="decompression bomb"):
        open_image(png_header_only(100_000, 100_000))
    with pytest.raises(BadImage, match="too large: 12000 x 12000 pixels"):  # under Pillow's own limit, over ours
        open_image(png_header_only(12_000, 12_000))
    with pytest.raises(BadImage, match="above the limit of 1000"):  # the limit is configurable
        open_image(encode(Image.new("RGB", (40, 40)), "PNG"), max_image_pixels=1000)


def test_odd_modes_become_correct_rgb():
    rgb = (200, 100, 50)
    cmyk_image = Image.new("CMYK", (20, 20), (0, 128, 191, 55))
    cmyk = encode(cmyk_image, "JPEG", quality=100)
    rgba_opaque = encode(Image.new("RGBA", (20, 20), (*rgb, 255)), "PNG")
    rgba_clear = encode(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), "PNG")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, *rgb] + [0] * 762)
    gray = encode(Image.new("L", (20, 20), 77), "PNG")
    gray16 = encode(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "PNG")
    expected = {
        "cmyk": (cmyk, np.array(cmyk_image.convert("RGB").getpixel((0, 0))), 3),  # (255 - C)(255 - K) / 255
        "rgba opaque": (rgba_opaque, np.array(rgb), 0),
        "rgba transparent -> white": (rgba_clear, np.array([255, 255, 255]), 0),
        "palette": (encode(palette, "PNG"), np.array(rgb), 0),
        "gray": (gray, np.array([77, 77, 77]), 0),
        "16-bit gray scaled, not clipped": (gray16, np.array([155, 155, 155]), 1),
    }
    for name, (data, want, tolerance) in expected.items():
        out = decode_eval(data, EVAL)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8, name
        assert np.abs(out.astype(int) - want).max() <= tolerance, (name, out[0, 0])
    assert probe_image(gray) == 1 and probe_image(gray16) == 1 and probe_image(rgba_opaque) == 3


def test_one_channel_models_get_one_channel():
    rgb = encode(Image.new("RGB", (20, 20), (255, 0, 0)), "JPEG", quality=100)
    out = decode_eval(rgb, Preprocessing(img_size=8, mean=(0.5,), std=(0.5,)))
    assert out.shape == (8, 8, 1)
    assert abs(int(out.mean()) - 76) <= 2  # luminance of pure red: 0.299 * 255


def test_exif_rotation_is_applied():
    # A 40x20 image, left half black, right half white, stored with "rotate 90 CW to display" (orientation 6).
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=100)
    out = decode_eval(data, Preprocessing(img_size=20, resize_mode="squash"))
    # Displayed upright the picture is 20 wide and 40 tall: the black half is on top.
    assert out[:8].mean() < 30 and out[12:].mean() > 225


def test_array_images():
    assert decode_eval(np.full((10, 10), 0.5, np.float32), EVAL)[0, 0].tolist() == [128, 128, 128]
    assert decode_eval(np.full((10, 10, 3), 7, np.uint8), EVAL)[0, 0].tolist() == [7, 7, 7]
    with pytest.raises(BadImage, match="not an image"):
        decode_eval(np.zeros((2, 3, 5)), EVAL)


def test_random_resized_box_stays_in_bounds():
    rng = np.random.default_rng(0)
    width, height = 300, 200
    areas, ratios = [], []
    for _ in range(2000):
        left, top, right, bottom = random_resized_box(width, height, (0.7, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        areas.append(w * h / (width * height))
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() >= 0.69 and areas.max() <= 1.0
    assert 3 / 4 - 0.02 <= ratios.min() and ratios.max() <= 4 / 3 + 0.02
    assert areas.std() > 0.05  # actually random


def test_train_flip_probability_is_one_half():
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = 255  # white left half
    data = encode(Image.fromarray(pixels), "PNG")
    augment = AugmentConfig(crop="resize", brightness=0, contrast=0, saturation=0)
    rng = np.random.default_rng(1)
    flipped = [decode_train(data, Preprocessing(img_size=32), augment, rng)[:, :4].mean() < 128 for _ in range(1000)]
    assert 0.45 < np.mean(flipped) < 0.55
    no_flip = AugmentConfig(crop="resize", hflip=False)
    assert decode_train(data, Preprocessing(img_size=32), no_flip, rng)[:, :4].mean() > 250


def test_pad_crop_shifts_by_at_most_the_padding():
    pixels = np.full((32, 32, 3), 200, np.uint8)
    data = encode(Image.fromarray(pixels), "PNG")
    rng = np.random.default_rng(0)
    borders = set()
    for _ in range(200):
        out = decode_train(data, Preprocessing(img_size=32), AugmentConfig.cifar(), rng)
        assert out.shape == (32, 32, 3)
        black_cols = int((out[16, :, 0] == 0).sum())
        black_rows = int((out[:, 16, 0] == 0).sum())
        assert black_cols <= 4 and black_rows <= 4
        borders.add((black_rows, black_cols))
    assert len(borders) > 10


def test_eval_box_geometry():
    assert eval_box(400, 200, Preprocessing(img_size=10, crop_pct=1.0)) == (0, 0, 400, 200)
    assert eval_box(400, 200, Preprocessing(img_size=10, crop_pct=0.5)) == (100, 50, 300, 150)
    assert eval_box(400, 200, Preprocessing(img_size=10, crop_pct=0.875, resize_mode="shortest")) == (
        112.5, 12.5, 287.5, 187.5)


def test_draft_decoding_is_used_and_close_to_full_decoding():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((1024, 768), Image.Resampling.BICUBIC)  # smooth, so a reduced decode loses nothing
    data = encode(big, "JPEG", quality=95)
    image = open_image(data)
    image.draft("RGB", (1024 // 4, 768 // 4))
    assert image.size == (256, 192)  # Pillow's DCT scaling is available for this JPEG
    fast = decode_eval(data, Preprocessing(img_size=64))
    full = decode_eval(data, Preprocessing(img_size=64), draft=False)
    assert fast.shape == full.shape == (64, 64, 3)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3


def test_draft_min_fraction_trades_a_little_resolution_for_speed():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((512, 384), Image.Resampling.BICUBIC)
    data = encode(photo, "JPEG", quality=90)

    def crop(draft, fraction):
        augment = AugmentConfig(hflip=False, draft_min_fraction=fraction)
        return decode_train(data, Preprocessing(img_size=224), augment, np.random.default_rng(5), draft=draft)

    exact = crop(False, 1.0)
    np.testing.assert_array_equal(crop(True, 1.0), exact)  # strict: a 224 crop of a 512 photo is never reduced
    reduced = crop(True, 0.5)  # half-size decode allowed: different pixels, same picture
    assert not np.array_equal(reduced, exact)
    assert np.abs(reduced.astype(int) - exact.astype(int)).mean() < 4


def test_augment_config_validation():
    with pytest.raises(ConfigError, match="scale"):
        AugmentConfig(scale=(0.0, 1.0))
    with pytest.raises(ConfigError, match="crop must be one of"):
        AugmentConfig(crop="center")
    with pytest.raises(ConfigError, match="brightness"):
        AugmentConfig(brightness=1.5)


def test_decode_takes_the_models_preprocessing_and_a_path_or_bytes(tmp_path):
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    path = tmp_path / "green.png"
    image.save(path)
    pre = Preprocessing(img_size=12, crop_pct=0.875, resize_mode="shortest")
    from_path = decode_eval(str(path), pre)  # what `flaxvision verify` and `predict` call
    np.testing.assert_array_equal(from_path, decode_eval(path.read_bytes(), pre))
    assert from_path.shape == (12, 12, 3) and from_path[6, 6].tolist() == [10, 200, 30]
    with pytest.raises(BadImage, match="above the limit of 100"):
        decode_eval(str(path), pre, max_image_pixels=100)
    with pytest.raises(BadImage, match="above the limit of 100"):
        decode_train(str(path), pre, AugmentConfig(), np.random.default_rng(0), max_image_pixels=100)
