"""EVA-02 (timm's Eva): parity with timm at two image sizes, export back to timm, fine-tuning paths, and the new
layers (SwiGLU, sub-LN, rotary embeddings, query/value biases) against timm's own modules.

Parametrized over the registry's eva02_* names, each made small (the same overrides passed to timm and to
flaxvision); references get random weights from timm, with randomised norms, biases and head. Nothing downloads.
"""

import json
import logging
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import torch
from flax import nnx
from safetensors.numpy import load_file
from safetensors.torch import save_file
from timm.layers.mlp import GluMlp, SwiGLU, SwiGLUPacked
from timm.layers.norm import LayerNorm  # eps 1e-6, as Eva's
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
from timm.models._hub import save_for_hf
from timm.models.eva import EvaAttention

import flaxvision
from flaxvision.commands.verify import preprocess, synthetic_images
from flaxvision.models import ViTConfig, build_model, model_config
from flaxvision.models.base import param_path
from flaxvision.models.vit import ViT
from flaxvision.models.vit_layers import Attention, rope_tables
from flaxvision.models.vit_layers import Mlp as FlaxMlp

NAMES = flaxvision.list_models("eva02_*")
TIMM_SMALL = dict(depth=2, embed_dim=64, num_heads=4)
OURS_SMALL = dict(depth=2, width=64, num_heads=4, mlp_dim=int(64 * 4 * 2 / 3))  # timm's int(D * mlp_ratio)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random norms, biases and head on top of timm's init (which starts norms at 1 / 0 and the head near 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "bias" in name or name.startswith("head"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return module.eval()


def timm_eva(directory, name: str, img_size: int, **kwargs) -> torch.nn.Module:
    model = randomise(timm.create_model(name, pretrained=False, img_size=img_size, **TIMM_SMALL, **kwargs))
    save_for_hf(model, str(directory), safe_serialization=True)
    return model


def real_looking(prep, count: int = 3) -> np.ndarray:
    return np.stack([preprocess(img, prep) for img in synthetic_images(count, 60, 80, seed=1)])


@nnx.jit
def _forward(model, x):
    return model(x)


def ours(model, x: np.ndarray) -> np.ndarray:
    model.eval()
    return np.asarray(_forward(model, jnp.asarray(x)))


def theirs(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


@pytest.mark.parametrize("img_size", [28, 42])  # 42 px: a 3 x 3 grid, rotary positions rescaled to timm's 16 x 16
@pytest.mark.parametrize("name", NAMES)
def test_timm_eva_parity_and_export(tmp_path, name, img_size):
    reference = timm_eva(tmp_path / "src", name, img_size, num_classes=3)
    model = flaxvision.load_pretrained(tmp_path / "src")
    assert model.config == model_config(name, img_size=img_size, num_classes=3, **OURS_SMALL)  # the registry's EVA-02
    x = real_looking(model.preprocessing)
    want = theirs(reference, x)
    diff = float(np.abs(ours(model, x) - want).max())
    assert diff <= 1e-5, diff
    out = flaxvision.save_pretrained(model, tmp_path / "out", format="timm")
    config = json.loads((out / "config.json").read_text())
    again = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    state = load_file(out / "model.safetensors")
    assert set(state) == set(reference.state_dict())  # the source's layout (base: q_proj / k_proj / v_proj)
    again.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    np.testing.assert_allclose(theirs(again, x), want, atol=1e-6, rtol=0)
    from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm reads our config.json itself
    np.testing.assert_allclose(theirs(from_dir, x), want, atol=1e-6, rtol=0)


def test_backbone_gets_a_new_head_and_the_same_features(tmp_path):
    reference = timm_eva(tmp_path, "eva02_base_patch14_224", 28)  # the mim_in22k default: num_classes=0
    assert reference.num_classes == 0
    loaded, report = flaxvision.load_pretrained(tmp_path, num_classes=3, return_report=True)
    model = cast(ViT, loaded)
    assert report.head_replaced and report.source_num_classes is None and model.config.num_classes == 3
    x = real_looking(model.preprocessing)
    features = theirs(reference, x)  # timm's pooled, fc-normed features (no head)
    assert model.head.bias is not None
    head = (features @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])).astype(np.float32)
    np.testing.assert_allclose(ours(model, x), head, atol=1e-5, rtol=0)  # the same graph as the parity test's


def test_bare_safetensors_is_read_as_eva02(tmp_path, caplog):
    reference = randomise(timm.create_model("eva02_small_patch14_224", pretrained=False, img_size=28, depth=1,
                                            embed_dim=128, num_heads=2, num_classes=4))  # fmt: skip
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="flaxvision.weights.timm_eva_format"):
        model = flaxvision.load_pretrained(tmp_path / "model.safetensors")
    assert "read as EVA-02 (gated MLP): rope with reference grid 16" in caplog.text
    assert model.config.rope and model.config.rope_ref_grid == 16 and model.config.mlp == "swiglu_packed"
    x = real_looking(model.preprocessing, count=2)
    assert float(np.abs(ours(model, x) - theirs(reference, x)).max()) <= 1e-5


@pytest.mark.parametrize("grid, ref", [(2, 16), (3, 16), (16, 16), (5, None)])
def test_rope_tables_equal_timms(grid, ref):
    rope = RotaryEmbeddingCat(16, in_pixels=False, feat_shape=[grid, grid], ref_feat_shape=[ref, ref] if ref else None)
    sin, cos = rope.get_embed().chunk(2, -1)
    ours_sin, ours_cos = rope_tables(grid, ref, 16)
    np.testing.assert_allclose(ours_sin, sin.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours_cos, cos.numpy(), atol=1e-6, rtol=0)
    if ref is not None and grid != ref:  # the rescaling matters
        assert np.abs(rope_tables(grid, None, 16)[0] - ours_sin).max() > 0.1


def _copy_from_torch(module: nnx.Module, reference: torch.nn.Module) -> None:
    """timm's parameters into ours by name: Linear weight -> kernel (transposed), LayerNorm weight -> scale."""
    params = {n: p.detach().numpy() for n, p in reference.named_parameters()}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        name = param_path(path)
        if name.endswith(".kernel"):
            var.set_value(jnp.asarray(params[name.removesuffix(".kernel") + ".weight"].T))
        elif name.endswith(".scale"):
            var.set_value(jnp.asarray(params[name.removesuffix(".scale") + ".weight"]))
        else:
            var.set_value(jnp.asarray(params[name]))
    assert len(params) == len(nnx.to_flat_state(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize(
    "mlp, scale_mlp, make",
    [
        ("swiglu_packed", False, lambda d, m: SwiGLUPacked(d, 2 * m)),  # DINOv2 giant, EVA-02 tiny/small
        ("swiglu_packed", True, lambda d, m: GluMlp(d, 2 * m, act_layer=torch.nn.SiLU, gate_last=False, norm_layer=LayerNorm)),
        ("swiglu", True, lambda d, m: SwiGLU(d, m, norm_layer=LayerNorm)),  # EVA-02 base: sub-LN before fc2
    ],
)
def test_mlp_equals_timms(mlp, scale_mlp, make):
    cfg = ViTConfig(width=16, num_heads=2, mlp_dim=24, mlp=mlp, scale_mlp=scale_mlp)
    reference = randomise(make(16, 24))
    ours_mlp = FlaxMlp(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    _copy_from_torch(ours_mlp, reference)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(_forward(ours_mlp, jnp.asarray(x))), want, atol=1e-5, rtol=0)


def test_attention_with_sub_ln_and_rope_equals_timms():
    """EvaAttention: q/v biases only, scale_norm (the LayerNorm between attention and proj), rope on the patches."""
    cfg = ViTConfig(img_size=12, patch_size=4, width=32, num_heads=2, key_bias=False, scale_attn_inner=True, rope=True, rope_ref_grid=16)
    reference = EvaAttention(32, num_heads=2, qkv_fused=True, norm_layer=LayerNorm, scale_norm=True, num_prefix_tokens=1)
    randomise(reference)
    ours_attn = Attention(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    _copy_from_torch(ours_attn, reference)
    x = np.random.default_rng(0).standard_normal((2, 1 + 9, 32)).astype(np.float32)
    table = RotaryEmbeddingCat(16, in_pixels=False, feat_shape=[3, 3], ref_feat_shape=[16, 16]).get_embed()
    with torch.no_grad():
        want = reference(torch.from_numpy(x), rope=table).numpy()
    np.testing.assert_allclose(np.asarray(_forward(ours_attn, jnp.asarray(x))), want, atol=1e-5, rtol=0)


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_fine_tuning_steps_with_scan_remat_and_bf16():
    """EVA-02 base (every option: SwiGLU, sub-LN, rope, q/v biases) trains in bf16 with remat and stochastic depth,
    its encoder one scanned block (the rope tables are constants of it). test_models' few-steps test covers each
    EVA-02 kind in float32."""
    config = model_config("eva02_base_patch14_224", img_size=28, num_classes=4, dtype="bfloat16", remat="full",
                          drop_path_rate=0.1, **OURS_SMALL)  # fmt: skip
    model = build_model(config, seed=1)
    model.train()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 28, 28, 3)), jnp.float32)
    y = jnp.arange(4) % 4
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: _loss(nnx.merge(graphdef, s), x, y))(state))
    assert jaxpr.count("scan[") == 1 and "length=2" in jaxpr  # one block, scanned over the depth
    before = np.array(model.blocks[1].mlp.fc2.kernel[...])
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(3)]
    assert all(np.isfinite(losses)) and len(set(losses)) == 3, losses
    assert model.blocks[0].attn.q_bias is not None and bool(jnp.any(model.blocks[0].attn.q_bias[...] != 0))  # zero-initialised
    assert not np.array_equal(np.asarray(model.blocks[1].mlp.fc2.kernel[...]), before)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mlp="geglu"), "mlp must be one of mlp, swiglu, swiglu_packed, got 'geglu'"),
        (dict(rope=True, width=36, num_heads=6), "rope needs a head size divisible by 4, got width 36 / 6 heads = 6"),
        (dict(key_bias=False, qkv_bias=False), r"key_bias=False \(query and value biases only\) needs qkv_bias=True"),
        (dict(rope_ref_grid=16), r"rope_ref_grid must be None or an integer from 1 to 1024 with rope=True, got 16 \(rope=False\)"),
    ],
)
def test_bad_eva_options_are_one_clear_error(kwargs, message):
    with pytest.raises(flaxvision.ConfigError, match=message):
        ViTConfig(**kwargs)
