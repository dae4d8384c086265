"""`flaxvision verify`: the converted model against the reference PyTorch implementation, end to end."""

import json
import shutil
from typing import cast

import numpy as np
import pytest
import timm
import transformers
from safetensors.numpy import load_file, save_file
from timm.models._hub import save_for_hf

import flaxvision
from flaxvision import cli
from flaxvision.commands import verify
from flaxvision.models.vit import ViT
from flaxvision.preprocessing import Preprocessing
from flaxvision.weights.convert import param_shapes
from flaxvision.weights.loader import materialise
from tests.helpers import flaxvision_cli

LABELS = {0: "tabby cat", 1: "golden retriever", 2: "red fox", 3: "hen", 4: "goldfish", 5: "daisy"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_vit")
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=64,
                                    patch_size=16, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(directory)
    return directory


def test_verify_end_to_end(hf_dir, tmp_path):
    figure = tmp_path / "check.png"
    result = flaxvision_cli("verify", str(hf_dir), "--json", "--figure", str(figure))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"max_abs_diff", "mean_abs_diff", "top1_agree", "top5_agree"} <= set(summary)
    assert 0 < summary["max_abs_diff"] <= 1e-4 and summary["mean_abs_diff"] <= summary["max_abs_diff"]
    assert summary["top1_agree"] == 1.0 and summary["top5_agree"] == 1.0
    assert summary["reference"] == "transformers" and summary["num_images"] == 4 and summary["passed"] is True
    assert all(row["flaxvision"][0] in LABELS.values() for row in summary["predictions"])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5_000


def test_verify_fails_beyond_the_tolerance(hf_dir, tmp_path):
    """A tampered weight (logits blown up 1e4-fold) and a tight tolerance: the numerical gap exceeds it, exit 1."""
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / name, tmp_path / name)
    state = load_file(tmp_path / "model.safetensors")
    state["classifier.weight"] = state["classifier.weight"] * 1e4
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    result = flaxvision_cli("verify", str(tmp_path), "--tolerance", "1e-6", "--figure", "")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("max |dlogits| ") and "top-1 agreement" in lines[1]
    assert lines[-1].startswith("FAIL: max |dlogits| > tolerance 1e-06")
    assert float(lines[1].split()[2]) > 1e-6
    assert not (tmp_path / verify.DEFAULT_FIGURE).exists()


def test_a_conversion_bug_is_caught(hf_dir):
    model, report = flaxvision.load_pretrained(hf_dir, return_report=True)
    model.eval()
    reference = verify.reference_model("transformers", model, report)
    inputs = np.stack([verify.preprocess(image, model.preprocessing) for image in verify.synthetic_images(2)])
    clean = verify.compare(model, reference, inputs)
    assert clean["max_abs_diff"] <= 1e-4 and clean["top1_agree"] == 1.0
    qkv = cast(ViT, model).blocks[0].attn.qkv
    q, k, v = np.split(np.asarray(qkv.kernel[...]), 3, axis=1)
    qkv.kernel[...] = np.concatenate([q, v, k], axis=1)  # a converter that mixed up k and v
    broken = verify.compare(model, reference, inputs)
    assert broken["max_abs_diff"] > 1e-3


def test_verify_npz_and_timm_references_in_process(tmp_path, capsys):
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=4)
    save_for_hf(tiny, str(tmp_path), safe_serialization=True)
    npz = flaxvision.save_pretrained(flaxvision.load_pretrained(tmp_path), tmp_path / "vit.npz", format="npz")
    assert cli.main(["verify", str(npz), "--json", "--figure", ""]) == 0  # reference: timm's own .npz reader
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "npz" and summary["reference"] == "timm" and summary["max_abs_diff"] <= 1e-4
    assert cli.main(["verify", str(tmp_path), "--reference", "transformers", "--json", "--figure", ""]) == 0
    assert json.loads(capsys.readouterr().out)["reference"] == "transformers"


def test_verify_bad_input_is_exit_code_2(tmp_path, capsys):
    config = flaxvision.model_config("cnn", features=(2, 2), hidden=4)
    cnn = materialise(config, {k: np.zeros(shape, np.float32) for k, shape in param_shapes(config).items()})
    flaxvision.save_pretrained(cnn, tmp_path)
    assert cli.main(["verify", str(tmp_path)]) == 2
    assert "verify compares a model with its PyTorch reference (transformers/timm); there is none for a CNN, which" in capsys.readouterr().err
    assert cli.main(["verify", str(tmp_path / "nothing.safetensors")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_generated_images_look_like_photographs():
    images = verify.synthetic_images(4)
    assert len(images) == 4 and all(im.shape == (240, 320, 3) and im.dtype == np.uint8 for im in images)
    for image in images:
        assert image.std() > 20  # not a constant array
        assert np.abs(np.diff(image.astype(float), axis=1)).mean() < 25  # mostly smooth, like a photo
    assert not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("resize_mode", ["squash", "shortest"])
def test_preprocess_geometry_and_normalisation(resize_mode):
    prep = Preprocessing(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), crop_pct=0.875, resize_mode=resize_mode, interpolation="bicubic")
    gray = np.full((60, 90, 3), 128, np.uint8)
    out = verify.preprocess(gray, prep)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[5, 5], (128 / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5]), atol=1e-6)
    stripes = np.zeros((60, 90, 3), np.uint8)
    stripes[:, 45:] = 255  # right half white: the centre crop keeps both halves
    out = verify.preprocess(stripes, Preprocessing(img_size=32, crop_pct=0.875, resize_mode=resize_mode))
    assert out[:, 0].max() < -0.9 and out[:, -1].min() > 0.9
