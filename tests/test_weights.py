"""Pretrained weights: parity with transformers and timm, round trips, resolution changes, heads, metadata.

Reference models get random weights from their own initialisers, are saved with their own writers, and are
imported by flaxvision; both run on the same inputs. Nothing is downloaded.
"""

import dataclasses
import json
import logging
from typing import Any, cast

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from safetensors.numpy import load_file
from timm.models._hub import save_for_hf
from timm.models.vision_transformer import _load_weights

import flaxvision
from flaxvision.models import abstract_model
from flaxvision.models.resnet import ResNet
from flaxvision.models.vit import ViT
from flaxvision.weights.convert import param_shapes
from flaxvision.weights.loader import materialise
from flaxvision.weights.posembed import resample_grid, resample_pos_embed

torch.manual_seed(0)


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


@nnx.jit
def _forward(model, x):
    return model(x)


def flax_logits(model, x: np.ndarray) -> np.ndarray:
    model.eval()
    return np.asarray(_forward(model, jnp.asarray(x)))  # one jitted function: models with equal graphs share compiles


def torch_logits(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.from_numpy(x).permute(0, 3, 1, 2))
    return getattr(out, "logits", out).numpy()


def assert_parity(model, reference, x: np.ndarray, atol: float = 1e-4) -> float:
    ours, theirs = flax_logits(model, x), torch_logits(reference, x)
    diff = float(np.abs(ours - theirs).max())
    assert diff <= atol, diff
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
    return diff


def hf_model(directory, **config) -> transformers.ViTForImageClassification:
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**config)).eval()
    model.save_pretrained(directory)
    return model


def timm_model(directory, name: str, **kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    save_for_hf(model, str(directory), safe_serialization=True)  # timm's own model.safetensors + config.json
    return model


SMALL_HF: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)


# ---- parity with the reference implementations -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """The full ViT-B/16 at 224 px (google/vit-base-patch16-224's config: eps 1e-12, 1000 classes), random weights."""
    directory = tmp_path_factory.mktemp("hf_base")
    return directory, hf_model(directory, num_labels=1000)


def test_transformers_vit_base_parity(hf_base):
    directory, reference = hf_base
    model = flaxvision.load_pretrained(directory)
    assert model.config == flaxvision.ViTConfig.base(layer_norm_eps=1e-12)
    assert model.num_params() == 86_567_656
    assert_parity(model, reference, images(224))


def test_create_model_checks_the_name_against_the_checkpoint(hf_base):
    directory, reference = hf_base
    model = flaxvision.create_model("vit_base_patch16_224", pretrained=directory)
    assert_parity(model, reference, images(224, batch=1, seed=3))
    wrong_name = r"is not a vit_small_patch16_224: width 768 \(weights\) vs 384.*use .*'vit_base_patch16_224'"
    with pytest.raises(flaxvision.FlaxvisionError, match=wrong_name):
        flaxvision.create_model("vit_small_patch16_224", pretrained=directory)
    with pytest.raises(flaxvision.FlaxvisionError, match=r"holds a ViT, not a resnet18"):
        flaxvision.create_model("resnet18", pretrained=directory)


@pytest.mark.parametrize(
    "config",
    [
        # patch 32 at 384 px, timm's eps, no qkv bias
        dict(SMALL_HF, image_size=384, patch_size=32, layer_norm_eps=1e-6, qkv_bias=False, num_labels=10),
        # tanh GELU, transformers' eps, 1 channel, 5 classes
        dict(SMALL_HF, hidden_act="gelu_pytorch_tanh", num_channels=1, num_labels=5),
        dict(SMALL_HF, hidden_act="quick_gelu", image_size=48, patch_size=16, num_labels=3),
    ],
    ids=["p32-384-eps1e-6-noqkvbias", "gelu-tanh-1ch", "quick-gelu"],
)
def test_transformers_parity(tmp_path, config):
    reference = hf_model(tmp_path, **config)
    model = flaxvision.load_pretrained(tmp_path)
    assert model.config.layer_norm_eps == config.get("layer_norm_eps", 1e-12)
    assert model.config.qkv_bias == config.get("qkv_bias", True)
    channels = config.get("num_channels", 3)
    assert model.preprocessing.channels == channels  # the normalisation follows the input channels
    x = np.random.default_rng(0).standard_normal((2, config["image_size"], config["image_size"], channels))
    assert_parity(model, reference, x.astype(np.float32))


def test_transformers_sharded_checkpoint(tmp_path):
    # num_labels is a PretrainedConfig keyword that ViTConfig's annotations omit.
    reference = transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL_HF, num_labels=4)).eval()  # pyright: ignore[reportCallIssue]
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, report = flaxvision.load_pretrained(tmp_path, return_report=True)
    assert len(report.files) > 1
    assert_parity(model, reference, images(32))
    index = flaxvision.load_pretrained(tmp_path / "model.safetensors.index.json")  # the index file itself
    np.testing.assert_array_equal(flax_logits(index, images(32)), flax_logits(model, images(32)))


def test_transformers_backbone_without_head(tmp_path):
    """ViTModel checkpoints (no classifier, a tanh pooler) load as a backbone once num_classes is given."""
    backbone = transformers.ViTModel(transformers.ViTConfig(**SMALL_HF)).eval()
    backbone.save_pretrained(tmp_path)
    with pytest.raises(flaxvision.FlaxvisionError, match="has no classifier head.*pass num_classes="):
        flaxvision.load_pretrained(tmp_path)
    model, report = flaxvision.load_pretrained(tmp_path, num_classes=3, return_report=True)
    assert report.head_replaced and report.source_num_classes is None
    assert report.ignored_keys == ("pooler.dense.weight", "pooler.dense.bias")
    x = images(32)
    with torch.no_grad():
        hidden = backbone(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    model.eval()
    np.testing.assert_allclose(np.asarray(cast(ViT, model).tokens(jnp.asarray(x))), hidden, atol=1e-4)


@pytest.fixture(scope="module")
def timm_base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("timm_base")
    return directory, timm_model(directory, "vit_base_patch16_224")


def test_timm_vit_base_parity(timm_base):
    directory, reference = timm_base
    model = flaxvision.load_pretrained(directory)
    assert model.config == flaxvision.ViTConfig.base()
    assert_parity(model, reference, images(224, seed=1))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", dict(depth=2, global_pool="avg", num_classes=7)),  # fc_norm after pooling
        ("vit_small_patch32_384", dict(depth=2, qkv_bias=False, num_classes=10)),
        ("vit_tiny_patch16_224", dict(depth=2, img_size=64, act_layer="gelu_tanh", num_classes=5)),
    ],
    ids=["avg-fc_norm", "p32-384-noqkvbias", "64px-gelu-tanh"],
)
def test_timm_parity(tmp_path, name, kwargs):
    reference = timm_model(tmp_path, name, **kwargs)
    model = flaxvision.load_pretrained(tmp_path)
    assert model.config.global_pool == kwargs.get("global_pool", "token")
    assert model.config.use_fc_norm == (kwargs.get("global_pool") == "avg")
    assert_parity(model, reference, images(model.config.img_size))


def test_timm_bare_safetensors_inferred_from_shapes(tmp_path):
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=6).eval()
    from safetensors.torch import save_file

    save_file(reference.state_dict(), tmp_path / "weights.safetensors")
    model = flaxvision.load_pretrained(tmp_path / "weights.safetensors")
    assert (model.config.width, model.config.num_heads, model.config.img_size, model.config.depth) == (384, 6, 64, 2)
    assert_parity(model, reference, images(64))


# ---- round trips -------------------------------------------------------------------------------------------------


def test_transformers_round_trip(tmp_path):
    labels = {i: name for i, name in enumerate(["apple pie", "bibimbap", "cannoli", "edamame"])}
    reference = hf_model(tmp_path / "src", **SMALL_HF, num_labels=4, id2label=labels, label2id={v: k for k, v in labels.items()})
    model = flaxvision.load_pretrained(tmp_path / "src")
    assert model.label_names == ("apple pie", "bibimbap", "cannoli", "edamame")
    out = flaxvision.save_pretrained(model, tmp_path / "out", format="transformers")
    again = transformers.ViTForImageClassification.from_pretrained(out).eval()
    assert again.config.id2label == labels
    x = images(32)
    np.testing.assert_allclose(torch_logits(again, x), torch_logits(reference, x), atol=1e-5, rtol=0)
    original, exported = load_file(tmp_path / "src" / "model.safetensors"), load_file(out / "model.safetensors")
    assert exported.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key])
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5, 0.5, 0.5] and processor["size"] == {"height": 32, "width": 32}
    assert flaxvision.load_pretrained(out).label_names == model.label_names


def test_timm_round_trip(tmp_path):
    reference = timm_model(tmp_path / "src", "vit_tiny_patch16_224", depth=2, img_size=64, num_classes=5, global_pool="avg")
    model = flaxvision.load_pretrained(tmp_path / "src")
    out = flaxvision.save_pretrained(model, tmp_path / "out", format="timm")
    config = json.loads((out / "config.json").read_text())
    overlay = dict(file=str(out / "model.safetensors"), num_classes=5)  # else timm drops a head of != 1000 classes
    again = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **config["model_args"]).eval()
    x = images(64)
    np.testing.assert_allclose(torch_logits(again, x), torch_logits(reference, x), atol=1e-5, rtol=0)
    from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm reads our config.json itself
    np.testing.assert_allclose(torch_logits(from_dir, x), torch_logits(reference, x), atol=1e-5, rtol=0)
    pretrained_cfg = cast(dict[str, Any], from_dir.pretrained_cfg)
    assert pretrained_cfg["interpolation"] == "bicubic" and pretrained_cfg["crop_pct"] == 0.9


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_npz_round_trip_through_timms_npz_reader(tmp_path, qkv_bias):
    reference = timm_model(tmp_path / "src", "vit_tiny_patch16_224", depth=2, img_size=48, num_classes=4, qkv_bias=qkv_bias)
    model = flaxvision.load_pretrained(tmp_path / "src")
    path = flaxvision.save_pretrained(model, tmp_path / "vit.npz", format="npz")
    keys = np.load(path).files
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in keys
    # timm's reader of Google's weights; it always has q/k/v biases (zeros stand in for qkv_bias=False)
    again = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=48, num_classes=4).eval()
    _load_weights(again, str(path))
    x = images(48)
    np.testing.assert_allclose(torch_logits(again, x), torch_logits(reference, x), atol=1e-5, rtol=0)
    via_cfg = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, depth=2, img_size=48, num_classes=4,
        pretrained_cfg_overlay=dict(file=str(path), custom_load=True, num_classes=4),
    ).eval()  # fmt: skip
    np.testing.assert_allclose(torch_logits(via_cfg, x), torch_logits(reference, x), atol=1e-5, rtol=0)
    back = flaxvision.load_pretrained(path)
    np.testing.assert_allclose(flax_logits(back, x), torch_logits(reference, x), atol=1e-5, rtol=0)


def test_big_vision_npz_variants(tmp_path):
    """big_vision's layout: 'params/' prefix, blocks stacked by nn.scan, sub-modules numbered 0/0/1/0, no CLS position."""
    reference = timm_model(tmp_path / "src", "vit_tiny_patch16_224", depth=3, img_size=32, num_classes=3)
    model = flaxvision.load_pretrained(tmp_path / "src")
    flat = dict(np.load(flaxvision.save_pretrained(model, tmp_path / "vit.npz", format="npz")))
    renames = (("MultiHeadDotProductAttention_1/", "MultiHeadDotProductAttention_0/"), ("LayerNorm_2/", "LayerNorm_1/"),
               ("MlpBlock_3/", "MlpBlock_0/"))  # fmt: skip
    big_vision = {}
    for key, value in flat.items():
        for old, new in renames:
            key = key.replace(old, new)
        big_vision[key] = value
    pos = big_vision.pop("Transformer/posembed_input/pos_embedding")
    big_vision["cls"] = big_vision["cls"] + pos[:, :1]  # the same model with the CLS position folded into the token
    big_vision["pos_embedding"] = pos[:, 1:]
    stacked = {}
    for i in range(3):
        prefix = f"Transformer/encoderblock_{i}/"
        for key in [k for k in big_vision if k.startswith(prefix)]:
            stacked.setdefault("Transformer/encoderblock/" + key[len(prefix):], []).append(big_vision.pop(key))
    big_vision.update({k: np.stack(v) for k, v in stacked.items()})
    np.savez(tmp_path / "bv.npz", **{f"params/{k}": v for k, v in big_vision.items()})
    loaded = flaxvision.load_pretrained(tmp_path / "bv.npz")
    assert_parity(loaded, reference, images(32), atol=1e-5)


SMALL_ZOO = {  # each family at a small size (eager initialisation of the full ResNet-18 takes ~10 s on 2 cores)
    "vit_tiny_patch16_224": dict(depth=2, img_size=32),
    "resnet18_cifar": dict(stage_depths=(1, 1), stage_widths=(8, 16)),
    "cnn": dict(features=(4, 8), hidden=16),
}


def random_model(name: str, **kwargs):
    """A model with random values in every parameter and batch statistic, without eager initialisation."""
    config = flaxvision.model_config(name, **kwargs)
    rng = np.random.default_rng(1)
    values = {k: rng.uniform(0.5, 1.0, s).astype(np.float32) * (0.1 if "kernel" in k else 1.0) for k, s in param_shapes(config).items()}
    return materialise(config, values)


@pytest.mark.parametrize("name", list(SMALL_ZOO))
def test_flaxvision_format_round_trip_any_family(tmp_path, name):
    model = random_model(name, num_classes=3, **SMALL_ZOO[name])  # ResNet statistics are not their init values
    x = np.random.default_rng(0).standard_normal((2, *model.input_shape)).astype(np.float32)
    model.label_names = ("a", "b", "c")
    out = flaxvision.save_pretrained(model, tmp_path)
    info = json.loads((out / "config.json").read_text())
    assert info["format"] == "flaxvision" and info["config_class"] == type(model.config).__name__
    for source in (out, out / "model.safetensors"):  # the file alone is self-describing
        back = flaxvision.load_pretrained(source)
        assert back.config == model.config and back.label_names == ("a", "b", "c")
        assert back.preprocessing == model.preprocessing
        np.testing.assert_array_equal(flax_logits(back, x), flax_logits(model, x))


def test_flaxvision_format_new_head_and_size(tmp_path):
    resnet = random_model("resnet18_cifar", **SMALL_ZOO["resnet18_cifar"])
    out = flaxvision.save_pretrained(resnet, tmp_path / "resnet")
    tuned, report = flaxvision.load_pretrained(out, num_classes=5, img_size=48, return_report=True)
    tuned_resnet, resnet = cast(ResNet, tuned), cast(ResNet, resnet)
    assert report.head_replaced and report.source_num_classes == 10 and tuned_resnet.head.kernel.shape == (16, 5)
    np.testing.assert_array_equal(np.asarray(tuned_resnet.bn1.mean[...]), np.asarray(resnet.bn1.mean[...]))  # statistics kept
    cnn = flaxvision.save_pretrained(random_model("cnn", **SMALL_ZOO["cnn"]), tmp_path / "cnn")
    wrong_size = r"cannot be loaded into a model with img_size=40.*fc1.kernel \(392, 16\) vs \(800, 16\)"
    with pytest.raises(flaxvision.FlaxvisionError, match=wrong_size):
        flaxvision.load_pretrained(cnn, img_size=40)


def test_export_refuses_what_a_format_cannot_hold(tmp_path):
    resnet = abstract_model(flaxvision.model_config("resnet18_cifar"))  # refused before its weights are read
    with pytest.raises(flaxvision.FlaxvisionError, match=r"format 'timm' cannot hold resnet18_cifar; save it with format='flaxvision'"):
        flaxvision.save_pretrained(resnet, tmp_path, format="timm")
    avg = abstract_model(flaxvision.model_config("vit_tiny_patch16_224", depth=1, img_size=32, global_pool="avg"))
    with pytest.raises(flaxvision.FlaxvisionError, match="CLS-token head only.*global_pool='avg'"):
        flaxvision.save_pretrained(avg, tmp_path, format="transformers")
    with pytest.raises(flaxvision.FlaxvisionError, match="npz layout has a CLS-token head.*global_pool='avg'"):
        flaxvision.save_pretrained(avg, tmp_path, format="npz")
    with pytest.raises(flaxvision.FlaxvisionError, match="unknown export format 'onnx'; choose one of transformers, timm, npz, flaxvision"):
        flaxvision.save_pretrained(avg, tmp_path, format="onnx")
    assert not (tmp_path / "model.safetensors").exists()


# ---- resolution -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("new", [24, 10, 7])
def test_resampling_matches_torch_interpolate(mode, antialias, new):
    grid = np.random.default_rng(0).standard_normal((14, 14, 8)).astype(np.float32)
    nchw = torch.from_numpy(grid).permute(2, 0, 1)[None]
    expected = F.interpolate(nchw, size=(new, new), mode=mode, antialias=antialias, align_corners=False)
    np.testing.assert_allclose(resample_grid(grid, (new, new), mode, antialias), expected[0].permute(1, 2, 0).numpy(), atol=1e-5)


def test_resample_pos_embed_keeps_the_cls_token():
    pos = np.random.default_rng(0).standard_normal((1, 1 + 14 * 14, 4)).astype(np.float32)
    out = resample_pos_embed(pos, 24)
    assert out.shape == (1, 1 + 24 * 24, 4)
    np.testing.assert_array_equal(out[:, 0], pos[:, 0])
    assert resample_pos_embed(pos, 14) is pos


@pytest.mark.parametrize("img_size", [384, 112])
def test_loading_at_another_resolution_matches_timm(tmp_path, img_size):
    kwargs: dict[str, Any] = dict(depth=2, num_classes=5)
    timm_model(tmp_path, "vit_tiny_patch16_224", **kwargs)
    model, report = flaxvision.load_pretrained(tmp_path, img_size=img_size, return_report=True)
    vit = cast(ViT, model)
    assert report.pos_embed_resampled == (14, img_size // 16)
    assert vit.pos_embed.shape == (1, 1 + (img_size // 16) ** 2, 192)
    assert model.preprocessing.img_size == img_size
    # timm's own resampling, from the 224 px file: checkpoint_filter_fn's bicubic with antialiasing
    overlay = dict(file=str(tmp_path / "model.safetensors"), num_classes=5)
    resampled = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, img_size=img_size, pretrained_cfg_overlay=overlay, **kwargs
    ).eval()
    np.testing.assert_allclose(np.asarray(vit.pos_embed[...]), cast(torch.Tensor, resampled.pos_embed).detach().numpy(), atol=1e-5)
    assert_parity(model, resampled, images(img_size))


# ---- heads, labels, preprocessing -------------------------------------------------------------------------------


def test_new_head_is_zero_initialised_and_reported(tmp_path, caplog):
    labels = {0: "cat", 1: "dog", 2: "fox"}
    hf_model(tmp_path, **SMALL_HF, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    full = flaxvision.load_pretrained(tmp_path)
    assert full.label_names == ("cat", "dog", "fox")
    with caplog.at_level(logging.WARNING, logger="flaxvision"):
        model, report = flaxvision.load_pretrained(tmp_path, num_classes=20, return_report=True)
    assert "head replaced (3 -> 20 classes, zeros-initialised)" in caplog.text
    assert report.head_replaced and report.source_num_classes == 3 and report.head_init == "zeros"
    assert "head replaced: 3 -> 20 classes" in report.summary()
    assert model.label_names is None and model.config.num_classes == 20
    vit, full_vit = cast(ViT, model), cast(ViT, full)
    assert vit.head.bias is not None
    assert not np.any(np.asarray(vit.head.kernel[...])) and not np.any(np.asarray(vit.head.bias[...]))
    x = jnp.asarray(images(32))
    model.eval()
    full.eval()
    np.testing.assert_array_equal(np.asarray(vit.features(x)), np.asarray(full_vit.features(x)))  # backbone untouched
    random_head = flaxvision.load_pretrained(tmp_path, num_classes=20, head_init="random", label_names=[f"c{i}" for i in range(20)])
    assert 0.01 < float(np.std(np.asarray(cast(ViT, random_head).head.kernel[...]))) < 0.03
    assert random_head.label_names is not None and random_head.label_names[19] == "c19"
    same, same_report = flaxvision.load_pretrained(tmp_path, num_classes=3, return_report=True)
    assert not same_report.head_replaced and same.label_names == ("cat", "dog", "fox")


def test_preprocessing_travels_with_the_weights(tmp_path):
    hf_model(tmp_path / "hf", **SMALL_HF, num_labels=2)
    assert flaxvision.load_pretrained(tmp_path / "hf").preprocessing == flaxvision.Preprocessing(
        img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0, resize_mode="squash", interpolation="bilinear"
    )  # ViTImageProcessor's defaults
    processor = {"do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
                 "size": {"shortest_edge": 36}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}}  # fmt: skip
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(processor))
    prep = flaxvision.load_pretrained(tmp_path / "hf").preprocessing
    assert (prep.mean, prep.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (prep.interpolation, prep.resize_mode) == ("bicubic", "shortest")
    assert prep.crop_pct == pytest.approx(32 / 36)
    timm_model(tmp_path / "timm", "vit_tiny_patch16_224", depth=1, num_classes=2)
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    config["pretrained_cfg"].update(mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6], crop_pct=0.875, crop_mode="squash")
    config["label_names"] = ["yes", "no"]
    (tmp_path / "timm" / "config.json").write_text(json.dumps(config))
    model = flaxvision.load_pretrained(tmp_path / "timm", img_size=384)
    assert model.preprocessing == flaxvision.Preprocessing(
        img_size=384, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=0.875, resize_mode="squash", interpolation="bicubic"
    )
    assert model.label_names == ("yes", "no")


def test_dtype_and_training_options(tmp_path):
    reference = hf_model(tmp_path, **SMALL_HF, num_labels=3)
    model = flaxvision.load_pretrained(tmp_path, dtype="bfloat16", drop_path_rate=0.1)
    assert model.config.dtype == "bfloat16" and model.config.drop_path_rate == 0.1
    x = images(32)
    np.testing.assert_allclose(flax_logits(model, x), torch_logits(reference, x), atol=0.05)  # bf16 rounding only
    with pytest.raises(flaxvision.ConfigError, match="width=32 would change the architecture of a pretrained model"):
        flaxvision.load_pretrained(tmp_path, width=32)
    bad = dataclasses.replace(model.config, num_classes=3)
    assert bad.dtype == "bfloat16"
