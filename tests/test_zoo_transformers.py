"""transformers' DeiT, DINOv2, CLIP and SigLIP image models in and out: tiny random-init models saved by
`save_pretrained` at two image sizes load into flaxvision with the same logits (features for backbones), export
back to the class that holds them, and `flaxvision verify` compares them. One CASES line per transformers class."""

from __future__ import annotations

import json
import shutil
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import flaxvision
from flaxvision import cli
from flaxvision.commands import verify
from flaxvision.errors import FlaxvisionError
from flaxvision.weights.hub import read_weights
from flaxvision.weights.layouts import parse_weights, writers
from flaxvision.weights.posembed import resample_pos_embed

ENCODER: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=7)
TEXT: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
LABELS = {0: "tabby cat", 1: "red fox", 2: "hen"}
SIZES = (28, 42)


def _labelled(**kw: Any) -> dict[str, Any]:
    return dict(kw, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})


def _dinov2(size: int, **kw: Any) -> T.Dinov2Config:
    fields: dict[str, Any] = {k: v for k, v in ENCODER.items() if k != "intermediate_size"}
    return T.Dinov2Config(**fields, mlp_ratio=2, layerscale_value=0.5, image_size=size, **kw)


# class name -> (its config at an image size, the class flaxvision exports it to (None: no head to compare), or the
# start of the reason export is refused).
CASES: dict[str, tuple[Any, str]] = {
    "DeiTForImageClassificationWithTeacher": (
        lambda s: T.DeiTConfig(**_labelled(**ENCODER, image_size=s)),
        "DeiTForImageClassificationWithTeacher",
    ),
    "DeiTForImageClassification": (
        lambda s: T.DeiTConfig(**_labelled(**ENCODER, image_size=s)),
        "DeiTForImageClassification",
    ),
    "DeiTModel": (lambda s: T.DeiTConfig(**ENCODER, image_size=s), "DeiTForImageClassification"),
    "Dinov2ForImageClassification": (lambda s: _dinov2(s, **_labelled()), "Dinov2ForImageClassification"),
    "Dinov2Model": (lambda s: _dinov2(s), "transformers' Dinov2ForImageClassification holds"),
    "CLIPVisionModel": (lambda s: T.CLIPVisionConfig(**ENCODER, image_size=s), "transformers has no class for a CLIP"),
    "CLIPModel": (
        lambda s: T.CLIPConfig(vision_config=dict(ENCODER, image_size=s), text_config=TEXT, projection_dim=16),
        "transformers has no class for a CLIP",
    ),  # fmt: skip
    "SiglipVisionModel": (lambda s: T.SiglipVisionConfig(**ENCODER, image_size=s), "transformers' SigLIP classes hold"),
    "SiglipForImageClassification": (
        lambda s: T.SiglipConfig(vision_config=dict(ENCODER, image_size=s), text_config=TEXT, **_labelled()),
        "SiglipForImageClassification",
    ),  # fmt: skip
}


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter moved off its init (LayerNorm gains, layer scale, zero tokens), so that each one matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(class name, image size) -> a directory written by that class's save_pretrained (built once per module)."""
    cache: dict[tuple[str, int], Any] = {}

    def get(name: str, size: int):
        if (name, size) not in cache:
            directory = tmp_path_factory.mktemp(f"{name}_{size}")
            torch.manual_seed(size)
            model = getattr(T, name)(CASES[name][0](size)).eval()
            _randomise(model, size)
            model.save_pretrained(directory)
            cache[name, size] = directory
        return cache[name, size]

    return get


def _inputs(model: Any) -> np.ndarray:
    return np.stack([verify.preprocess(image, model.preprocessing) for image in verify.synthetic_images(2, 60, 80)])


def _reference(directory: Any, backbone: bool) -> Any:
    return verify._transformers_reference(T, directory, features=backbone)


@pytest.mark.parametrize("name", CASES)
def test_loads_with_the_reference_outputs_and_exports_back(name, saved, tmp_path):
    target = CASES[name][1]
    for size in SIZES:
        directory = saved(name, size)
        backbone = not parse_weights(read_weights(directory)).has_head
        model, report = flaxvision.load_pretrained(directory, num_classes=3 if backbone else None, return_report=True)
        assert report.format == "transformers" and model.config.img_size == size
        assert report.head_replaced == backbone and model.label_names == (None if backbone else tuple(LABELS.values()))
        model.eval()
        inputs = _inputs(model)
        result = verify.compare(model, _reference(directory, backbone), inputs, features=backbone)
        # SigLIP backbone features (map-pooled, large magnitude) differ by ~2e-5 from transformers 5.24 in float32
        assert result["max_abs_diff"] <= (3e-5 if backbone else 1e-5), (name, size, result)
        if size != SIZES[0]:
            continue  # the export does not depend on the image size: once
        if target.startswith("transformers"):
            with pytest.raises(FlaxvisionError, match=target.replace("(", r"\(")):
                flaxvision.save_pretrained(model, tmp_path / "out", format="transformers")
            continue
        out = flaxvision.save_pretrained(model, tmp_path / "out", format="transformers")
        assert json.loads((out / "config.json").read_text())["architectures"] == [target]
        reloaded = getattr(T, target).from_pretrained(out).eval()  # the class config.json names, as verify builds it
        assert verify.compare(model, verify.Reference(lambda x, m=reloaded: (m(pixel_values=x).logits, "logits")), inputs)["max_abs_diff"] <= 1e-5
        again = flaxvision.load_pretrained(out)  # and flaxvision reads its own export: same config, labels, prep
        assert again.config == model.config and again.label_names == model.label_names and again.preprocessing == model.preprocessing


def test_what_is_not_loaded_is_listed(saved):
    _, clip = flaxvision.load_pretrained(saved("CLIPModel", 28), num_classes=2, return_report=True)
    assert "logit_scale" in clip.ignored_keys and "visual_projection.weight" in clip.ignored_keys
    assert any(k.startswith("text_model.") for k in clip.ignored_keys) and not any(
        k.startswith("vision_model.") for k in clip.ignored_keys
    )
    _, dino = flaxvision.load_pretrained(saved("Dinov2Model", 28), num_classes=2, return_report=True)
    assert dino.ignored_keys == ("embeddings.mask_token",)
    _, siglip = flaxvision.load_pretrained(saved("SiglipForImageClassification", 28), return_report=True)
    assert siglip.ignored_keys and all(k.startswith("vision_model.head.") for k in siglip.ignored_keys)


def test_refusals_are_one_line(saved, tmp_path):
    config = T.CLIPConfig(vision_config=dict(ENCODER, image_size=28), text_config=TEXT, **_labelled())
    T.CLIPForImageClassification(config).save_pretrained(tmp_path / "clip")
    with pytest.raises(
        FlaxvisionError, match="CLIPForImageClassification classifies the mean of the patch tokens without a final norm"
    ):
        flaxvision.load_pretrained(tmp_path / "clip")
    fields: dict[str, Any] = {k: v for k, v in ENCODER.items() if k != "intermediate_size"}
    T.Dinov2Model(T.Dinov2Config(**fields, image_size=28, use_swiglu_ffn=True)).save_pretrained(tmp_path / "giant")
    with pytest.raises(FlaxvisionError, match="SwiGLU MLP"):
        flaxvision.load_pretrained(tmp_path / "giant", num_classes=2)
    (tmp_path / "bad").mkdir()
    shutil.copy(saved("Dinov2Model", 28) / "model.safetensors", tmp_path / "bad")
    good = json.loads((saved("Dinov2Model", 28) / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**good, "hidden_size": "32"}))
    with pytest.raises(FlaxvisionError, match="hidden_size='32' should be an integer"):
        flaxvision.load_pretrained(tmp_path / "bad", num_classes=2)


def test_bare_safetensors_are_told_apart_by_their_tensor_names(saved, tmp_path):
    """Without config.json the layout comes from the tensor names (and the architecture from their shapes)."""
    for name, fragment in (("DeiTForImageClassificationWithTeacher", "DeiT"), ("Dinov2Model", "DINOv2"), ("CLIPVisionModel", "CLIP"),
                           ("SiglipVisionModel", "SigLIP")):  # fmt: skip
        weights = read_weights(saved(name, 28) / "model.safetensors")
        module = next(m for m in writers("transformers") if m.detect(weights))
        assert fragment in module.FAMILY
        assert parse_weights(weights).config.width == ENCODER["hidden_size"]


def test_dinov2_position_interpolation_differs_from_load_time_resampling(saved):
    """transformers' Dinov2 interpolates the position table at forward time without antialiasing; flaxvision
    resamples it at load with antialiasing (timm's way): the tables differ, so parity holds at the saved size only."""
    reference = T.Dinov2Model.from_pretrained(saved("Dinov2Model", 28)).eval()
    table = reference.embeddings.position_embeddings.detach()
    with torch.no_grad():
        theirs = reference.embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 36, 32), 42, 42).numpy()
    ours = resample_pos_embed(table.numpy(), 6, num_prefix_tokens=1)
    plain = resample_pos_embed(table.numpy(), 6, num_prefix_tokens=1, antialias=False)
    assert np.abs(plain - theirs).max() <= 1e-5 < np.abs(ours - theirs).max()


@pytest.mark.parametrize("name", ["DeiTForImageClassificationWithTeacher", "SiglipVisionModel"])
def test_verify_cli(name, saved, capsys):
    assert cli.main(["verify", str(saved(name, 28)), "--json", "--figure", ""]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["passed"] and summary["max_abs_diff"] <= 3e-5 and summary["reference"] == "transformers"
    backbone = name == "SiglipVisionModel"
    assert summary["compared"] == ("features" if backbone else "logits")
    assert ("pooler_output" in summary["reference_output"]) == backbone and (summary["predictions"] == []) == backbone


def test_preprocessing_comes_from_the_image_processor(saved, tmp_path):
    """CLIPImageProcessor (shortest edge + centre crop) and SiglipImageProcessor (a squash) as their files say."""
    for name, processor, expected in (
        ("CLIPVisionModel", T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=28), dict(resize_mode="shortest", crop_pct=28 / 32)),
        ("SiglipVisionModel", T.SiglipImageProcessor(size={"height": 28, "width": 28}), dict(resize_mode="squash", crop_pct=1.0)),
    ):  # fmt: skip
        directory = tmp_path / name
        shutil.copytree(saved(name, 28), directory)
        processor.save_pretrained(directory)
        prep = parse_weights(read_weights(directory)).preprocessing
        assert prep is not None and prep.img_size == 28 and prep.interpolation == "bicubic"
        assert (prep.resize_mode, prep.crop_pct) == (expected["resize_mode"], pytest.approx(expected["crop_pct"]))
        assert prep.mean == tuple(processor.image_mean) and prep.std == tuple(processor.image_std)


def test_a_distilled_model_gets_both_heads_replaced(tmp_path):
    """DeiT's distillation head is a head too: a new num_classes replaces both (zero-initialised), not only `head`."""
    model = flaxvision.create_model("deit_base_distilled_patch16_224", depth=1, width=32, num_heads=2, mlp_dim=64,
                                    img_size=32, num_classes=3)  # fmt: skip
    flaxvision.save_pretrained(model, tmp_path)
    tuned, report = flaxvision.load_pretrained(tmp_path, num_classes=5, return_report=True)
    assert report.head_replaced and tuned.head.kernel.shape == tuned.head_dist.kernel.shape == (32, 5)  # type: ignore[union-attr]
    assert not np.any(np.asarray(tuned.head_dist.kernel[...]))  # type: ignore[union-attr]
    assert tuned.config.distilled and tuned(jnp.zeros((1, 32, 32, 3))).shape == (1, 5)
