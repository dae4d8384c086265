"""ResNet-18/34/50 and ConvNeXt: parity with timm and transformers, export back, backbone-only weights, fine-tuning.

Every registered name that timm knows is built by timm at a small size with random weights (BatchNorm running
statistics and layer scales randomised, so that eval mode and gamma matter), saved as timm's push_to_hub saves it,
loaded by flaxvision, and compared on photograph-like images at two sizes; the export is read back by timm itself.
transformers' ResNet (basic, bottleneck) and ConvNeXt go the same way through save_pretrained / from_pretrained.
"""

import json
from pathlib import Path
from typing import Any, cast

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file
from timm.models._hub import save_for_hf

import flaxvision
from flaxvision.commands.verify import preprocess, synthetic_images
from flaxvision.models import ConvNeXtConfig, ResNetConfig
from flaxvision.models.convnext import PRETRAINED_PREPROCESSING as CONVNEXT_PREPROCESSING
from flaxvision.models.registry import named_preprocessing
from flaxvision.models.resnet import PRETRAINED_PREPROCESSING as RESNET_PREPROCESSING
from flaxvision.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from flaxvision.train import TrainConfig, fit
from tests.helpers import batches, colour_data, flat_params

TOLERANCE = 1e-5
SIZES = (32, 64)
# timm's constructors at a small size: a shortcut with a stride and one without, in every family.
TIMM_SMALL: dict[type, dict[str, Any]] = {
    ResNetConfig: dict(layers=[1, 2, 1, 1], channels=(8, 16, 24, 32)),
    ConvNeXtConfig: dict(depths=(1, 2, 1, 1), dims=(16, 24, 32, 40)),
}
NAMES = [n for n in flaxvision.list_models() if type(flaxvision.model_config(n)) in TIMM_SMALL and n in timm.list_models()]


def randomise(module: Any, seed: int = 0) -> Any:
    """Non-trivial BatchNorm statistics and affine parameters, and layer scales of order 1 (not their 1e-6 init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "layer_scale_parameter")):
                p.uniform_(0.5, 1.5, generator=g)
    return module.eval()


def inputs(model) -> np.ndarray:
    """Photograph-like images through the model's own eval preprocessing (resize, crop, normalise)."""
    return np.stack([preprocess(image, model.preprocessing) for image in synthetic_images(2, 72, 96)])


@nnx.jit
def _forward(model, x):
    return model(x)


def compare(model, reference, x: np.ndarray | None = None) -> float:
    x = inputs(model) if x is None else x
    model.eval()
    ours = np.asarray(_forward(model, jnp.asarray(x)))
    with torch.no_grad():
        out = reference(torch.from_numpy(x).permute(0, 3, 1, 2))
    theirs = getattr(out, "logits", out).numpy()
    assert ours.shape == theirs.shape
    diff = float(np.abs(ours - theirs).max())
    assert diff <= TOLERANCE, diff
    assert np.abs(theirs).max() > 0.05  # the comparison is not between two near-zero outputs
    return diff


def timm_reference(directory: Path):
    """What `flaxvision verify` builds: timm's create_model(architecture, **model_args) + a strict state dict load."""
    info = json.loads((directory / "config.json").read_text())
    model = timm.create_model(info["architecture"], pretrained=False, **info["model_args"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_timm_parity_and_export(tmp_path, name):
    reference = randomise(timm.create_model(name, pretrained=False, num_classes=5, **TIMM_SMALL[type(flaxvision.model_config(name))]))
    save_for_hf(reference, str(tmp_path), safe_serialization=True)  # timm's own model.safetensors + config.json
    model, report = flaxvision.load_pretrained(tmp_path, return_report=True)
    assert report.format == "timm" and model.num_params() == sum(p.numel() for p in reference.parameters())
    assert model.preprocessing == {**RESNET_PREPROCESSING, **CONVNEXT_PREPROCESSING}[name]  # the checkpoint's pretrained_cfg
    if isinstance(model.config, ResNetConfig):
        assert model.config.block == ("bottleneck" if name == "resnet50" else "basic")
        assert report.ignored_keys and all(k.endswith("num_batches_tracked") for k in report.ignored_keys)
    for size in SIZES:
        model = flaxvision.load_pretrained(tmp_path, img_size=size)
        compare(model, reference)
    out = flaxvision.save_pretrained(model, tmp_path / "export", format="timm")
    compare(model, timm_reference(out))  # timm reads flaxvision's export itself
    back = flaxvision.load_pretrained(out)
    assert back.config == model.config and back.preprocessing == model.preprocessing


HF: dict[str, Any] = {
    "resnet-basic": (transformers.ResNetForImageClassification, transformers.ResNetConfig,
                     dict(embedding_size=16, hidden_sizes=[16, 24, 32, 40], depths=[1, 2, 1, 1], layer_type="basic")),
    "resnet-bottleneck": (transformers.ResNetForImageClassification, transformers.ResNetConfig,
                          dict(embedding_size=12, hidden_sizes=[32, 48, 64, 96], depths=[1, 2, 1, 1], layer_type="bottleneck")),
    "convnext": (transformers.ConvNextForImageClassification, transformers.ConvNextConfig,
                 dict(hidden_sizes=[16, 24, 32, 40], depths=[1, 2, 1, 1], num_stages=4)),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(HF))
def test_transformers_parity_and_export(tmp_path, kind):
    cls, config_cls, fields = HF[kind]
    reference = randomise(cls(config_cls(**fields, num_labels=5)))
    reference.save_pretrained(tmp_path)
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    processor.save_pretrained(tmp_path)  # as microsoft/resnet-50 and facebook/convnext-tiny-224 ship it
    model = flaxvision.load_pretrained(tmp_path)
    assert model.num_params() == sum(p.numel() for p in reference.parameters())
    prep = model.preprocessing
    assert (prep.crop_pct, prep.resize_mode, prep.interpolation, prep.mean) == (0.875, "shortest", "bicubic", IMAGENET_MEAN)
    for size in SIZES:
        model = flaxvision.load_pretrained(tmp_path, img_size=size)
        compare(model, reference)
    out = flaxvision.save_pretrained(model, tmp_path / "export", format="transformers")
    shipped = cls.from_pretrained(out).eval()  # transformers reads flaxvision's export itself
    compare(model, shipped)
    back = flaxvision.load_pretrained(out)
    assert back.config == model.config and back.preprocessing == model.preprocessing


def test_backbone_only_checkpoints_get_a_new_head(tmp_path):
    backbones = {"resnet": transformers.ResNetModel(transformers.ResNetConfig(**HF["resnet-bottleneck"][2])),
                 "convnext": transformers.ConvNextModel(transformers.ConvNextConfig(**HF["convnext"][2]))}  # fmt: skip
    for kind, backbone in backbones.items():
        randomise(backbone).save_pretrained(tmp_path / kind)
        with pytest.raises(flaxvision.FlaxvisionError, match="no classifier head.*pass num_classes="):
            flaxvision.load_pretrained(tmp_path / kind)
        loaded, report = flaxvision.load_pretrained(tmp_path / kind, num_classes=3, img_size=32, return_report=True)
        model = cast(Any, loaded)
        assert report.head_replaced and report.source_num_classes is None and "head replaced: None -> 3" in report.summary()
        assert not np.any(np.asarray(model.head.kernel[...]))  # zero-initialised
        x = inputs(model)
        model.eval()
        with torch.no_grad():
            pooled = backbone(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).pooler_output.reshape(2, -1).numpy()
        features = nnx.jit(lambda m, x: m.features(x))(model, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(features), pooled, atol=TOLERANCE)


def test_registered_names_have_timm_parameter_counts_and_preprocessing():
    for name in NAMES:
        with torch.device("meta"):  # shapes only: timm's full-size models without allocating or initialising them
            reference = timm.create_model(name, pretrained=False)
        assert flaxvision.model_info(name)["params"] == sum(p.numel() for p in reference.parameters()), name
        prep, timm_cfg = named_preprocessing(name, flaxvision.model_config(name)), cast(dict[str, Any], reference.pretrained_cfg)
        assert (prep.img_size, prep.crop_pct, prep.interpolation) == (timm_cfg["input_size"][-1], timm_cfg["crop_pct"], timm_cfg["interpolation"])
        assert (prep.mean, prep.std) == (tuple(timm_cfg["mean"]), tuple(timm_cfg["std"])), name


def test_fine_tune_convnext_with_layer_decay_and_the_last_block_only(tmp_path):
    """The trainer's layer-wise decay and --train-only last:K read ConvNeXt's blocks; drop path needs its rngs."""
    (xt, yt), (xv, yv) = colour_data(64, 0), colour_data(32, 1)
    overrides: dict[str, Any] = dict(depths=(1, 1), dims=(16, 32), drop_path_rate=0.2)
    config = TrainConfig(model="convnext_tiny", model_overrides=overrides, img_size=16, epochs=1, batch_size=32, optimizer="adamw",
                         lr=1e-3, log_every=1, progress=False, report=False, augment="none", layer_decay=0.8, train_only="last:1")  # fmt: skip
    model = flaxvision.create_model("convnext_tiny", num_classes=4, img_size=16, **overrides)
    before = flat_params(model)
    result = fit(config, run_dir=tmp_path, model=model, train_data=batches(xt, yt, 32), val_data=batches(xv, yv, 16),
                 class_names=["r", "g", "b", "grey"])  # fmt: skip
    after = flat_params(result.model)
    frozen = {k for k in before if np.array_equal(before[k], after[k])}
    # last:1 of 2 blocks: the stem and stage 0 stay, stage 1 (its downsampling too), the norm and the head train.
    assert frozen == {k for k in before if k.startswith(("stem_", "stages.0."))}
    assert result.summary["steps"] == 2 and np.isfinite(result.summary["final_val_loss"])


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("resnet50", dict(stage_depths=(1, 1), stage_widths=(8, 16))), ("convnext_tiny", dict(depths=(1, 2), dims=(16, 32), drop_path_rate=0.3))],
    ids=["resnet50", "convnext-drop-path"],
)
def test_trains_in_bfloat16_with_jit(name, overrides):
    """Jitted steps in train mode: the loss is finite and falls, master weights stay float32; ResNet's batch
    statistics move, ConvNeXt's drop path draws new masks each call and is off in eval mode."""
    model = cast(Any, flaxvision.create_model(name, num_classes=4, img_size=32, dtype="bfloat16", **overrides))
    x, y = colour_data(8, 0, size=32)
    x, y = jnp.asarray(x, jnp.float32) / 255.0, jnp.asarray(y)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    before = np.asarray(model.stages[1][0].bn3.mean[...]).copy() if name == "resnet50" else None

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    losses = [float(step(model, optimizer, x, y)) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] and model.head.kernel[...].dtype == jnp.float32
    if before is not None:
        assert not np.allclose(np.asarray(model.stages[1][0].bn3.mean[...]), before)
    else:
        assert not np.array_equal(_forward(model, x), _forward(model, x))  # fresh drop-path masks
        model.eval()
        np.testing.assert_array_equal(_forward(model, x), _forward(model, x))


def test_a_convnext_run_resumed_mid_epoch_ends_equal_to_an_uninterrupted_one(tmp_path):
    """Exact resume for a new family: ConvNeXt with drop path (its RNG streams), layer scale and layer decay,
    interrupted mid-epoch and resumed, ends bit-identical to a run that never stopped."""
    from flaxvision.train.recipe import make_loaders
    from tests.helpers import straight_and_interrupted

    config = TrainConfig(model="convnext_tiny", epochs=2, batch_size=8, eval_batch_size=8, log_every=2, seed=5,
                         optimizer="adamw", lr=3e-3, layer_decay=0.8, progress=False, report=False, checkpoint_every=2,
                         keep_checkpoints=3)  # fmt: skip

    def make_model():
        return flaxvision.create_model("convnext_tiny", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), img_size=32,
                                       num_classes=4, drop_path_rate=0.2)  # fmt: skip

    straight, resumed = straight_and_interrupted(
        tmp_path, config, make_model, lambda model, splits: make_loaders(config, model, splits.train, splits.val)
    )
    a, b = flat_params(straight.model), flat_params(resumed.model)
    assert a.keys() == b.keys() and any("gamma" in k for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert resumed.summary["final_val_accuracy"] == straight.summary["final_val_accuracy"]
