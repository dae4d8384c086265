"""Host augmentation in the workers: RandAugment (timm's grammar and ops), TrivialAugment Wide (torchvision's ops and
bins) and random erasing (timm's semantics, on uint8): against the references, statistically, and as a pure
function of the per-example RNG (the same batches with and without grain workers)."""

import io
import math
import types

import numpy as np
import pytest
from PIL import Image

from flaxvision.data import AugmentConfig, load, make_loader
from flaxvision.data.autoaugment import (
    RAND_INCREASING_OPS,
    RAND_OP_NAMES,
    RAND_OPS,
    TRIVIAL_BINS,
    TRIVIAL_OPS,
    RandAugmentSpec,
    auto_augment,
    fill_colour,
    parse_randaugment,
    rand_augment,
    rand_op,
    trivial_augment,
    trivial_op,
)
from flaxvision.data.erasing import AREA, erasing_boxes, random_erase
from flaxvision.data.synthetic import photo, write_image_folder
from flaxvision.data.transforms import decode_train
from flaxvision.errors import ConfigError
from flaxvision.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from flaxvision.train.config import TrainConfig
from tests.helpers import flaxvision_cli

BILINEAR, BICUBIC = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC
# A non-square picture (width 48, height 40: a swapped axis shows) in RGB and in L.
RGB = photo(np.random.default_rng(0), 48, 40, noise=np.random.default_rng(1).normal(0, 12, (64, 64, 1)).astype(np.int16))
IMAGES = {"RGB": RGB, "L": RGB.convert("L")}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# ---- the grammar --------------------------------------------------------------------------------------------


def test_defaults_and_each_option():
    assert parse_randaugment("rand") == RandAugmentSpec(magnitude=10, num_layers=2, prob=0.5, magnitude_std=0,
                                                        magnitude_max=10, ops=RAND_OPS, weights=None)  # fmt: skip
    spec = parse_randaugment("rand-inc1-mmax15-p0.8-n3-mstd0.5-m9")  # any order
    assert (spec.magnitude, spec.num_layers, spec.prob, spec.magnitude_std, spec.magnitude_max) == (9, 3, 0.8, 0.5, 15)
    assert spec.ops == RAND_INCREASING_OPS and parse_randaugment("rand-inc0").ops == RAND_OPS
    assert parse_randaugment("rand-mstd101").magnitude_std == math.inf  # timm: above 100 means uniform
    weighted = parse_randaugment("rand-tweights")
    assert weighted.weights is not None and math.isclose(sum(weighted.weights), 1.0)
    assert parse_randaugment("rand-t3a").ops == ("SolarizeIncreasing", "Desaturate", "GaussianBlur")


@pytest.mark.parametrize("text", ["rand", "rand-m9-mstd0.5-inc1", "rand-m7-n4-p0.9", "rand-m15-mmax20-mstd1",
                                  "rand-mstd200-m5", "rand-tweights-n3-m9", "rand-t3aw-inc1", "rand-t3a-m6"])
def test_parsing_agrees_with_timm(text):
    auto_augment_module = pytest.importorskip("timm.data.auto_augment")
    theirs = auto_augment_module.rand_augment_transform(text, dict(translate_const=100, img_mean=(128, 128, 128)))
    ours = parse_randaugment(text)
    assert ours.num_layers == theirs.num_layers
    assert list(ours.ops) == [op.name for op in theirs.ops]
    for op in theirs.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (ours.prob, ours.magnitude, ours.magnitude_std)
        assert (op.magnitude_max or 10) == ours.magnitude_max
    if theirs.choice_weights is None:
        assert ours.weights is None
    else:
        assert ours.weights is not None
        np.testing.assert_allclose(ours.weights, theirs.choice_weights)


def test_every_op_of_timms_sets_exists():
    auto_augment_module = pytest.importorskip("timm.data.auto_augment")
    names = {*auto_augment_module._RAND_TRANSFORMS, *auto_augment_module._RAND_INCREASING_TRANSFORMS,
             *auto_augment_module._RAND_3A, *auto_augment_module._RAND_WEIGHTED_3A,
             *auto_augment_module._RAND_WEIGHTED_0}  # fmt: skip
    assert set(RAND_OP_NAMES) == names


@pytest.mark.parametrize("text, token", [
    ("rand-m9-foo1", "unknown option 'foo1'"), ("augmix-m9", "must start with 'rand'"), ("rand-m9x", "'m9x'"),
    ("rand-w0", "'w0' was removed"), ("rand-tfoo", "unknown transform set 'tfoo'"), ("rand-m9-m8", "'m' given twice"),
    ("rand-n0", "n must be >= 1"), ("rand-p1.5", "p must be in [0, 1]"), ("rand-inc2", "inc must be 0 or 1"),
    ("rand-mmax0", "mmax must be >= 1"), ("rand--m9", "empty option"), ("rand-m", "m takes an integer"),
    ("rand-n16-tweights", "n must be <= 15"), ("rand-bogus", "unknown option 'bogus'"),
])  # fmt: skip
def test_bad_strings_are_one_line_config_errors(text, token):
    with pytest.raises(ConfigError) as err:
        parse_randaugment(text)
    message = str(err.value)
    assert message.startswith(f"randaugment={text!r}: ") and token in message and "\n" not in message
    with pytest.raises(ConfigError, match="randaugment="):
        TrainConfig(randaugment=text)  # the recipe checks it at once
    with pytest.raises(ConfigError, match="randaugment="):
        AugmentConfig(randaugment=text)


def test_augment_config_checks_the_host_options():
    with pytest.raises(ConfigError, match="exclude each other"):
        AugmentConfig(randaugment="rand-m9", trivialaugment=True)
    with pytest.raises(ConfigError, match="reprob"):
        AugmentConfig(reprob=1.5)
    with pytest.raises(ConfigError, match="remode"):
        AugmentConfig(remode="noise")
    with pytest.raises(ConfigError, match="recount"):
        AugmentConfig(recount=0)


# ---- the ops against the references ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", RAND_OP_NAMES)
def test_rand_ops_match_timm(name, mode, monkeypatch):
    """Our op at magnitude m == timm's op applied to timm's level function of m (its ranges, signs, rounding), pixel
    for pixel: both end in the same PIL call, so any difference is a wrong magnitude -> parameter mapping."""
    aa = pytest.importorskip("timm.data.auto_augment")
    image = IMAGES[mode]
    fill = fill_colour(IMAGENET_MEAN if mode == "RGB" else (0.45,))
    hparams = dict(translate_const=100, img_mean=fill)
    for negate in (False, True):
        # timm negates when random.random() > 0.5: pin its draw to choose the sign
        monkeypatch.setattr(aa, "random", types.SimpleNamespace(random=lambda negate=negate: 1.0 if negate else 0.0))
        for magnitude in (0, 1, 4.5, 9, 10, 13):  # 13: above the default clip, as with mmax
            level_fn = aa.LEVEL_TO_ARG[name]
            args: tuple = level_fn(magnitude, hparams) if level_fn is not None else ()
            for resample in (BILINEAR, BICUBIC):
                try:
                    theirs = aa.NAME_TO_OP[name](image, *args, fillcolor=fill, resample=resample)
                except ValueError:  # Pillow >= 13 refuses to keep 0 bits; older Pillow (and we) keep none: black
                    assert name.startswith("Posterize") and args[0] <= 0
                    theirs = Image.new(image.mode, image.size, 0)
                ours = rand_op(image, name, magnitude, negate=negate, resample=resample, fill=fill)
                assert ours.mode == image.mode and ours.size == image.size
                np.testing.assert_array_equal(pixels(ours), pixels(theirs), err_msg=f"{name} m={magnitude} {negate=}")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_trivial_augment_ops_and_bins_match_torchvision(mode):
    """Each op at each bin and sign against torchvision's `_apply_op` at torchvision's own magnitude for that bin.
    Within 1 LSB on at most 5% of the pixels: torchvision's bins are float32 (ours float64) and its shear goes
    through tan(atan(m)); a last-bit difference in an affine matrix or a blend factor rounds some pixels the other
    way (most at Brightness 0.01, where many values sit on a rounding edge). A wrong op, range, sign or bin would
    differ by far more."""
    autoaugment = pytest.importorskip("torchvision.transforms.autoaugment")
    from torchvision.transforms import InterpolationMode

    space = autoaugment.TrivialAugmentWide()._augmentation_space(TRIVIAL_BINS)
    assert list(space) == list(TRIVIAL_OPS)
    image = IMAGES[mode]
    fill = fill_colour(IMAGENET_MEAN if mode == "RGB" else (0.45,))
    fill_list = list(fill) if isinstance(fill, tuple) else [fill]
    for name, (magnitudes, signed) in space.items():
        for magnitude_bin in (0, 1, 7, 15, 22, 29, 30):
            for negate in (False, True) if signed else (False,):
                m = float(magnitudes[magnitude_bin]) if magnitudes.ndim else 0.0
                if name.startswith("Translate"):  # float32 bins: bin 15 is 15.999999, which int() makes 15 px;
                    m = round(m, 3)  # ours is the exact 32 * 15 / 30 = 16 px
                theirs = autoaugment._apply_op(image, name, -m if negate else m, InterpolationMode.BILINEAR, fill_list)
                ours = trivial_op(image, name, magnitude_bin, negate=negate, resample=BILINEAR, fill=fill)
                diff = np.abs(pixels(ours) - pixels(theirs))
                where = f"{name} bin {magnitude_bin} {negate=}"
                assert diff.max() <= 1 and (diff > 0).mean() <= 0.05, where


def test_draws_are_a_pure_function_of_the_rng_and_vary_with_it():
    spec = parse_randaugment("rand-m9-mstd0.5-inc1")
    fill = fill_colour(IMAGENET_MEAN)
    for augment in (lambda rng: rand_augment(RGB, spec, rng, fill), lambda rng: trivial_augment(RGB, rng, fill)):
        outputs = [pixels(augment(np.random.default_rng([0, 3, row]))) for row in range(24)]
        again = [pixels(augment(np.random.default_rng([0, 3, row]))) for row in range(24)]
        assert all(np.array_equal(a, b) for a, b in zip(outputs, again))
        assert len({o.tobytes() for o in outputs}) >= 15  # different rows: (mostly) different images


def test_rand_augment_prob_signs_and_magnitude_noise():
    fill = fill_colour(IMAGENET_MEAN)
    never = RandAugmentSpec(prob=0.0)
    assert all(np.array_equal(pixels(rand_augment(RGB, never, np.random.default_rng(s), fill)), pixels(RGB))
               for s in range(10))  # fmt: skip
    rotate = RandAugmentSpec(magnitude=9, num_layers=1, prob=1.0, ops=("Rotate",))
    candidates = {(negate, resample): pixels(rand_op(RGB, "Rotate", 9, negate=negate, resample=resample, fill=fill))
                  for negate in (False, True) for resample in (BILINEAR, BICUBIC)}  # fmt: skip
    seen = set()
    for seed in range(40):
        out = pixels(rand_augment(RGB, rotate, np.random.default_rng(seed), fill))
        seen |= {key for key, expected in candidates.items() if np.array_equal(out, expected)}
    assert seen == set(candidates)  # both signs, both filters, and nothing else
    noisy = RandAugmentSpec(magnitude=9, num_layers=1, prob=1.0, magnitude_std=2.0, ops=("Rotate",))
    outs = [pixels(rand_augment(RGB, noisy, np.random.default_rng(seed), fill)) for seed in range(10)]
    assert sum(any(np.array_equal(o, c) for c in candidates.values()) for o in outs) <= 1  # magnitudes vary


# ---- random erasing ----------------------------------------------------------------------------------------------


def test_erasing_boxes_follow_timms_area_aspect_and_count():
    height, width = 64, 80
    counts = set()
    for seed in range(400):
        boxes = erasing_boxes(height, width, 3, np.random.default_rng(seed))
        assert 1 <= len(boxes) <= 3
        counts.add(len(boxes))
        # target area uniform in [0.02, 1/3] / count of the image (count = len(boxes): at this size every box fits);
        # h and w are rounded from sqrt(area * aspect), sqrt(area / aspect), aspect in [0.3, 1/0.3]
        low, high = (a / len(boxes) * height * width for a in AREA)
        slack = lambda area: 0.5 * math.sqrt(area) * (math.sqrt(0.3) + math.sqrt(1 / 0.3)) + 0.25
        for top, left, h, w in boxes:
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h < height and w < width
            assert low - slack(low) <= h * w <= high + slack(high)
    assert counts == {1, 2, 3}
    single = [erasing_boxes(height, width, 1, np.random.default_rng(s))[0] for s in range(300)]
    fractions = np.array([h * w / (height * width) for _, _, h, w in single])
    assert fractions.min() < 0.04 and 0.3 < fractions.max()  # the whole [0.02, 1/3] range is used
    aspects = np.array([h / w for _, _, h, w in single])
    assert 0.3 * 0.85 < aspects.min() < 0.45 and 1 / 0.3 / 0.85 > aspects.max() > 2.2
    assert len({(top, left) for top, left, _, _ in single}) > 250  # positions vary


def test_const_erasing_fills_with_the_mean_and_covers_timms_area():
    zeros = np.zeros((32, 40, 3), np.uint8)
    mean_value = np.rint(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)  # normalises to 0
    for seed in range(50):
        out = random_erase(zeros, np.random.default_rng(seed), prob=1.0, mode="const", max_count=1, mean=IMAGENET_MEAN,
                           std=IMAGENET_STD)  # fmt: skip
        erased = (out != 0).any(-1)
        assert 0.015 <= erased.mean() <= 0.36
        np.testing.assert_array_equal(out[erased], np.broadcast_to(mean_value, (int(erased.sum()), 3)))
        ys, xs = np.nonzero(erased)
        assert erased[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # one rectangle
    assert (zeros == 0).all()  # the input is never written to


def test_pixel_erasing_is_normal_in_normalised_space():
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    values = []
    for seed in range(60):
        out = random_erase(np.zeros((48, 48, 3), np.uint8), np.random.default_rng(seed), prob=1.0, mode="pixel",
                           max_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # fmt: skip
        values.append(out[(out != 0).any(-1)])
    z = (np.concatenate(values) / 255.0 - mean) / std  # normalised as the device does
    # The reference: N(0, 1) through the same uint8 rounding and clipping, from an independent generator
    reference = np.random.default_rng(123).standard_normal((200_000, 3))
    reference = (np.rint(mean * 255 + std * 255 * reference).clip(0, 255) / 255.0 - mean) / std
    assert len(z) > 5000
    np.testing.assert_allclose(z.mean(0), reference.mean(0), atol=0.04)
    np.testing.assert_allclose(z.std(0), reference.std(0), atol=0.04)
    assert abs(float(np.median(z))) < 0.06 and 0.9 < float(z.std()) < 1.02
    for q in (0.05, 0.25, 0.75, 0.95):
        np.testing.assert_allclose(np.quantile(z, q, axis=0), np.quantile(reference, q, axis=0), atol=0.08)


def test_rand_erasing_is_one_colour_per_box_and_grayscale_works():
    zeros = np.zeros((32, 32, 1), np.uint8)  # with this mean and std an erased pixel is 0 only at z < -4.5
    colours = set()
    for seed in range(20):
        out = random_erase(zeros, np.random.default_rng(seed), prob=1.0, mode="rand", max_count=1, mean=(0.45,),
                           std=(0.1,))  # fmt: skip
        erased = out[..., 0] != 0
        assert out.shape == (32, 32, 1) and erased.any() and len(np.unique(out[erased])) == 1
        colours.add(int(out[erased][0, 0]))
    assert len(colours) > 10  # one N(0, 1) draw per box
    pixel = random_erase(zeros, np.random.default_rng(4), prob=1.0, mode="pixel", max_count=1, mean=(0.45,),
                         std=(0.1,))  # fmt: skip
    assert len(np.unique(pixel[pixel != 0])) > 20


def test_erasing_probability_is_reprob():
    zeros = np.zeros((32, 32, 3), np.uint8)
    rng = np.random.default_rng(0)
    erased = [random_erase(zeros, rng, prob=0.25, mode="const", max_count=2, mean=IMAGENET_MEAN,
                           std=IMAGENET_STD).any() for _ in range(3000)]  # fmt: skip
    assert 0.225 < np.mean(erased) < 0.275  # +-3.2 sigma of 3000 draws
    assert not any(random_erase(zeros, rng, prob=0.0, mode="pixel", max_count=1, mean=IMAGENET_MEAN,
                                std=IMAGENET_STD).any() for _ in range(200))  # fmt: skip


# ---- in decode_train, the loader and the recipe ---------------------------------------------------------------


PRE = Preprocessing(img_size=24, mean=IMAGENET_MEAN, std=IMAGENET_STD)
DATA = jpeg(photo(np.random.default_rng(5), 64, 48))


def test_decode_train_applies_them_after_the_crop_and_flip_and_is_deterministic():
    plain = AugmentConfig()
    strong = AugmentConfig(randaugment="rand-m9-mstd0.5-inc1", reprob=0.5, remode="pixel", recount=2)
    rows = range(16)
    a = [decode_train(DATA, PRE, strong, np.random.default_rng([0, 7, r])) for r in rows]
    b = [decode_train(DATA, PRE, strong, np.random.default_rng([0, 7, r])) for r in rows]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    base = [decode_train(DATA, PRE, plain, np.random.default_rng([0, 7, r])) for r in rows]
    assert sum(not np.array_equal(x, y) for x, y in zip(a, base)) >= 12
    # With the ops never applying (p0) and erasing never happening, the crop and flip draws are the plain ones:
    # the augmentation runs after them and draws nothing they use.
    inert = AugmentConfig(randaugment="rand-p0", reprob=1e-12)
    assert all(np.array_equal(decode_train(DATA, PRE, inert, np.random.default_rng([0, 7, r])), x)
               for r, x in zip(rows, base))  # fmt: skip


@pytest.mark.parametrize("options", [dict(randaugment="rand-m9-mstd0.5-inc1"), dict(randaugment="rand-t3a-m9"),
                                     dict(trivialaugment=True)])  # fmt: skip
def test_one_channel_models_get_one_channel(options):
    gray = Preprocessing(img_size=24, mean=(0.45,), std=(0.25,))
    augment = AugmentConfig(crop="pad_crop", reprob=1.0, **options)
    for row in range(12):
        out = decode_train(DATA, gray, augment, np.random.default_rng([1, 0, row]))
        assert out.shape == (24, 24, 1) and out.dtype == np.uint8
    array = np.asarray(IMAGES["L"])[:, :, None]
    out = auto_augment(array, np.random.default_rng(0), randaugment=None, trivialaugment=False, mean=(0.45,))
    assert out is array  # nothing asked: untouched


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    write_image_folder(root, num_classes=2, per_split={"train": 6, "validation": 1}, max_side=40, min_side=32)
    return load(str(root))


def test_workers_give_the_same_augmented_batches_as_in_process(data):
    augment = AugmentConfig(randaugment="rand-m9-mstd0.5-inc1", reprob=0.5, recount=2)

    def epoch(workers, augment):
        loader = make_loader(data.train, preprocessing=PRE, batch_size=4, train=True, seed=3, workers=workers,
                             augment=augment)  # fmt: skip
        try:
            return list(loader)
        finally:
            loader.close()

    in_process, with_workers, plain = epoch(0, augment), epoch(2, augment), epoch(0, AugmentConfig())
    assert len(in_process) == len(with_workers) == 3
    for a, b, c in zip(in_process, with_workers, plain):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["id"], c["id"])  # the order does not depend on the augmentation
        assert not np.array_equal(a["image"], c["image"])  # and it did augment


def test_the_recipe_passes_them_on_in_every_crop_mode():
    from flaxvision.presets import get_preset
    from flaxvision.train.recipe import augment_config

    options = dict(randaugment="rand-m9-mstd0.5-inc1", reprob=0.25, remode="const", recount=3)
    preset = get_preset("food101-vit-b16-adamw").replace(**options)
    assert TrainConfig.from_dict(preset.to_dict()) == preset  # config.json round trip
    for mode, crop in (("rrc", "random_resized"), ("cifar", "pad_crop"), ("none", "resize")):
        augment = augment_config(preset.replace(augment=mode))
        assert augment.crop == crop and {k: getattr(augment, k) for k in options} == options
    assert augment_config(preset.replace(randaugment=None, trivialaugment=True)).trivialaugment
    assert augment_config(TrainConfig()) == AugmentConfig()  # by default no host ops


def test_cli_rejects_a_bad_randaugment_string_in_one_line():
    result = flaxvision_cli("train", "--randaugment", "rand-m9-bogus", "--dataset", "builtin:digits", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["flaxvision: error: randaugment='rand-m9-bogus': unknown option 'bogus'; use m<int>, n<int>, "
                     "p<float>, mstd<float>, mmax<int>, inc<0|1>, t<weights|3a|3aw>"]  # fmt: skip
