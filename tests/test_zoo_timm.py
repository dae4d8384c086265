"""timm's ViT family in and out: every ViT registry name that timm builds as a VisionTransformer (ViT, DeiT, DeiT
distilled, DeiT III, DINOv2 with and without registers, CLIP, SigLIP).

Each name's timm model at a small size (its options kept), random weights (layer-scale gammas, norms, tokens made
to matter), saved as timm saves it, is loaded by flaxvision at two image sizes and compared on real-looking images
with timm's model (at the second size: timm's own checkpoint_filter_fn resampling), exported back and rebuilt by
timm from the config.json alone. A fine-tuning test trains every option through the trainer.
"""

import dataclasses
import json
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from safetensors.numpy import load_file
from safetensors.torch import save_file
from timm.models._hub import save_for_hf
from timm.models.vision_transformer import checkpoint_filter_fn

import flaxvision
from flaxvision.commands.verify import preprocess, synthetic_images
from flaxvision.models.registry import get_model_spec, list_models, model_config, named_preprocessing
from flaxvision.models.vit import ViTConfig
from flaxvision.train import TrainConfig, Trainer
from flaxvision.weights.convert import param_shapes
from flaxvision.weights.hub import read_weights
from flaxvision.weights.layouts import parse_weights
from flaxvision.weights.loader import materialise
from tests.helpers import colour_data, flat_params, hub_snapshot, run_cli

TIMM_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


def _timm_vit(name: str) -> bool:
    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__ in TIMM_VIT_MODULES


# The registry's ViT names with published (timm) preprocessing, and the plain ViT-B/16.
NAMES = [n for n in list_models() if isinstance(model_config(n), ViTConfig) and _timm_vit(n)
         and (get_model_spec(n).preprocessing is not None or n == "vit_base_patch16_224")]  # fmt: skip
TIMM_SMALL = dict(depth=2, embed_dim=64, num_heads=4)
FV_SMALL = dict(depth=2, width=64, num_heads=4, mlp_dim=256)
PARITY: dict[str, dict[str, float]] = {}  # name -> max |d output| per check (printed with -s)


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values where timm's init leaves near-constants: norms, biases, layer-scale gammas (1e-5), the CLS /
    distillation / register tokens and the attention pool's latent (std 1e-6), and a head that gives O(1) logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in module.named_parameters():
            noise = torch.randn(value.shape, generator=generator)
            if name.endswith(("norm.weight", "1.weight", "2.weight", "pre.weight", "gamma")) and value.ndim == 1:
                value.copy_(1.0 + 0.5 * noise)
            elif value.ndim == 1 or "token" in name or "latent" in name:
                value.copy_(0.5 * noise)
            elif name.startswith("head"):
                value.copy_(0.5 * noise)
    return module.eval()


def timm_model(name: str, grid: int, **kwargs) -> torch.nn.Module:
    patch = model_config(name).patch_size
    return timm.create_model(name, pretrained=False, img_size=grid * patch, **TIMM_SMALL, **kwargs).eval()


@nnx.jit(static_argnames="features")
def _outputs(model, x, features: bool):
    return model.features(x) if features else model(x)


def flax_out(model, x: np.ndarray, features: bool = False) -> np.ndarray:
    """The model's logits (or pooled features), jitted: the models of one test share their compiles."""
    model.eval()
    return np.asarray(_outputs(model, jnp.asarray(x), features))


def inputs(prep) -> np.ndarray:
    return np.stack([preprocess(image, prep) for image in synthetic_images(2, 60, 80)])


def torch_out(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("name", NAMES)
def test_timm_checkpoint_in_and_out(tmp_path, name):
    reference = randomised(timm_model(name, 2))
    backbone = bool(reference.num_classes == 0)  # DINOv2 and SigLIP are published without a head
    if not backbone:
        reference = randomised(timm_model(name, 2, num_classes=5))
    save_for_hf(reference, str(tmp_path / "timm"), safe_serialization=True)
    head: dict[str, Any] = dict(num_classes=5, head_init="random") if backbone else {}
    model, report = flaxvision.load_pretrained(tmp_path / "timm", return_report=True, **head)
    patch = model_config(name).patch_size
    assert model.config == model_config(name, **FV_SMALL, img_size=2 * patch, num_classes=5)  # every option read
    if get_model_spec(name).preprocessing is not None:  # timm's pretrained_cfg = the registry's (crop_pct aside)
        crop_pct = cast(Any, timm.models.get_pretrained_cfg(name)).crop_pct
        assert model.preprocessing == dataclasses.replace(named_preprocessing(name, model.config), crop_pct=crop_pct)
    assert report.head_replaced == backbone and report.source_num_classes == (None if backbone else 5)
    x = inputs(model.preprocessing)
    # A backbone's output is its pooled features (timm's forward with num_classes=0), else the logits.
    diffs = {"own size": max_diff(flax_out(model, x, backbone), torch_out(reference, x))}

    # A second size: the loader's resampling against timm's checkpoint_filter_fn for a model of that size.
    bigger, _ = flaxvision.load_pretrained(tmp_path / "timm", img_size=3 * patch, return_report=True, **head)
    resized = timm_model(name, 3, num_classes=reference.num_classes)
    resized.load_state_dict(checkpoint_filter_fn(reference.state_dict(), cast(Any, resized)), strict=True)
    x3 = inputs(bigger.preprocessing)
    diffs["resampled"] = max_diff(flax_out(bigger, x3, backbone), torch_out(resized, x3))

    # Out: timm rebuilds the model from config.json alone (the right class) and loads every tensor strictly.
    out = flaxvision.save_pretrained(model, tmp_path / "out", format="timm")
    info = json.loads((out / "config.json").read_text())
    again = timm.create_model(info["architecture"], pretrained=False, **info["model_args"]).eval()
    assert type(again) is type(reference)
    assert {m.eps for m in again.modules() if isinstance(m, torch.nn.LayerNorm)} == {model.config.layer_norm_eps}
    again.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(out / "model.safetensors").items()}, strict=True)
    diffs["exported"] = max_diff(flax_out(model, x), torch_out(again, x))
    assert flaxvision.load_pretrained(out).config == model.config

    # A bare state dict: every option that shows in tensor names and shapes is inferred the same.
    save_file(reference.state_dict(), tmp_path / "bare.safetensors")
    bare = parse_weights(read_weights(tmp_path / "bare.safetensors")).config
    unseen = ("num_heads", "layer_norm_eps", "act", "init_values", "num_classes")  # not in the tensors
    assert {f: getattr(bare, f) for f in bare.__dataclass_fields__ if f not in unseen} == {
        f: getattr(model.config, f) for f in bare.__dataclass_fields__ if f not in unseen
    }
    PARITY[name] = diffs
    print(name, {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-5, diffs


def random_vit(name: str, seed: int = 0, **overrides):
    """A flaxvision model with random values in every parameter (layer scale and norms far from their init)."""
    config = model_config(name, **overrides)
    rng = np.random.default_rng(seed)
    values = {k: (rng.standard_normal(s) * (0.5 if len(s) == 1 else 0.1) + (1.0 if k.endswith(("scale", "gamma")) else 0.0))
              .astype(np.float32) for k, s in param_shapes(config).items()}  # fmt: skip
    return materialise(config, values)


@pytest.mark.parametrize("name", ["deit_base_distilled_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_verify_a_saved_timm_model(tmp_path, name, capsys):
    patch = model_config(name).patch_size
    model = random_vit(name, **FV_SMALL, img_size=2 * patch, num_classes=4)
    flaxvision.save_pretrained(model, tmp_path, format="timm")
    code, out, err = run_cli(["verify", tmp_path, "--json", "--figure", ""], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["reference"] == "timm" and summary["passed"] and summary["max_abs_diff"] <= 1e-5


def test_hf_hub_timm_ids(tmp_path, monkeypatch, capsys):
    """`hf-hub:timm/<name>` is the Hub repo timm/<name>: read from the cache offline, one line when not cached."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = "hf-hub:timm/vit_small_patch14_dinov2.lvd142m"
    code, _, err = run_cli(["verify", source, "--figure", ""], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "fetch 'timm/vit_small_patch14_dinov2.lvd142m' and it is not in the cache" in err and "HF_HUB_OFFLINE=1" in err
    reference = randomised(timm_model("vit_small_patch14_dinov2", 2))
    save_for_hf(reference, str(tmp_path / "ckpt"), safe_serialization=True)
    snapshot = hub_snapshot(tmp_path / "hub", "timm/vit_small_patch14_dinov2.lvd142m", tmp_path / "ckpt")
    model, report = flaxvision.load_pretrained(source, num_classes=3, return_report=True)
    assert report.files == (str(snapshot / "model.safetensors"),) and report.head_replaced
    x = inputs(model.preprocessing)
    assert max_diff(flax_out(model, x, True), torch_out(reference, x)) <= 1e-5


# Every option through the trainer: (distilled, pre-norm, qk-norm, layer scale) and (registers without position
# embeddings, no CLS token, attention pooling, layer scale).
TRAIN_KINDS = {
    "distilled-prenorm-qknorm-ls": ("deit_base_distilled_patch16_224",
                                    dict(pre_norm=True, patch_bias=False, qk_norm=True, init_values=1e-5), "dots"),
    "reg4-map-ls": ("vit_small_patch14_reg4_dinov2", dict(class_token=False, global_pool="map"), "full"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(TRAIN_KINDS))
def test_fine_tune_every_option(kind):
    name, options, remat = TRAIN_KINDS[kind]
    model = random_vit(name, **options, img_size=16, patch_size=4, width=32, num_heads=2, mlp_dim=64, depth=2,
                       num_classes=4, dtype="bfloat16", remat=remat, scan_blocks=True)  # fmt: skip
    model.preprocessing = named_preprocessing(name, model.config)
    before = flat_params(model)
    config = TrainConfig(model=name, epochs=1, batch_size=16, optimizer="adamw", lr=1e-2, layer_decay=0.75,
                         train_only="last:2", dtype="bfloat16", progress=False, report=False)  # fmt: skip
    trainer = Trainer(config, model, steps_per_epoch=3)
    xt, yt = colour_data(16, 0)
    for _ in range(3):
        trainer.state = trainer.train_step(trainer.state, trainer.stage.put({"image": xt, "label": yt}))
    assert np.isfinite(trainer.read_train_metrics()["loss"])
    after = flat_params(trainer.current_model())
    assert all(np.isfinite(v).all() for v in after.values())
    frozen = {k for k in before if model.config.layer_index(k) == 0}  # last:2 of 2 blocks: the embeddings stay
    assert frozen >= {"patch_embed.kernel", "pos_embed"} and not {k for k in frozen if not np.array_equal(before[k], after[k])}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    new_parts = {"head_dist.kernel", "blocks.1.ls1.gamma", "blocks.1.attn.q_norm.scale"} if "distilled" in kind else {
        "attn_pool.latent", "attn_pool.kv.kernel", "blocks.1.ls2.gamma"}  # fmt: skip
    assert new_parts <= changed and len(changed) > 0.8 * (len(before) - len(frozen))
    assert jax.tree.leaves(trainer.state.params)[0].dtype == jnp.float32  # float32 master weights under bf16


def test_timm_variants_still_refused(tmp_path):
    """Gated MLPs (SwiGLU, DINOv2-giant's packed SwiGLU) and dynamic_img_pad: one line naming the option."""
    from timm.layers.mlp import SwiGLU, SwiGLUPacked

    for mlp, option in ((SwiGLUPacked, r"gated \(GLU, packed SwiGLU\) MLP"), (SwiGLU, r"gated \(SwiGLU\) MLP")):
        bare = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, mlp_layer=mlp,
                                 act_layer=torch.nn.SiLU)  # fmt: skip
        save_file(bare.state_dict(), tmp_path / "gated.safetensors")
        with pytest.raises(flaxvision.FlaxvisionError, match=f"{option} is not supported by flaxvision's ViT"):
            flaxvision.load_pretrained(tmp_path / "gated.safetensors")
    padded = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, dynamic_img_pad=True)
    save_for_hf(padded, str(tmp_path / "padded"), safe_serialization=True)
    with pytest.raises(flaxvision.FlaxvisionError, match="dynamic_img_pad=True is not supported by flaxvision's ViT"):
        flaxvision.load_pretrained(tmp_path / "padded")


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(global_pool="token_avg"), r"has no global_pool='token_avg' \(CLS token and patch mean concatenated\)"),
        (dict(pre_norm=True), "patch-projection bias exactly when pre_norm is off; .* pre_norm=True, patch_bias=True"),
        (dict(distilled=True, reg_tokens=4), r"VisionTransformerDistilled \(DeiT distilled\) has no register tokens and no fc_norm"),
        (dict(class_token=False, global_pool="map", qkv_bias=False), "always has q/kv biases; this model has qkv_bias=False"),
    ],
)
def test_export_refuses_what_timm_cannot_build(tmp_path, options, reason):
    from flaxvision.models import abstract_model
    from flaxvision.weights.layouts import export_formats

    config = model_config("vit_tiny_patch16_224", depth=1, img_size=32, **options)
    assert "timm" not in export_formats(config)
    with pytest.raises(flaxvision.FlaxvisionError, match=f"{reason}; save it with format="):
        flaxvision.save_pretrained(abstract_model(config), tmp_path, format="timm")
    assert not list(tmp_path.iterdir())


TIMM_NAMED = [n for n in list_models() if get_model_spec(n).preprocessing is not None]


@pytest.mark.parametrize("name", TIMM_NAMED)
def test_every_named_preprocessing_is_timms_default_pretrained_cfg(name):
    """The preprocessing a registry name carries is that of timm's default weights for the name (its first tag)."""
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg is not None, f"timm has no pretrained config for {name}"
    prep = get_model_spec(name).preprocessing
    assert prep is not None
    assert (prep.img_size, prep.interpolation) == (cfg.input_size[1], cfg.interpolation)
    np.testing.assert_allclose([prep.crop_pct, *prep.mean, *prep.std], [cfg.crop_pct, *cfg.mean, *cfg.std], rtol=1e-6)
