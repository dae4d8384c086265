"""Model zoo tests, parametrized over the registry: a newly registered model is tested for free."""

import ast
import dataclasses
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxvision
from flaxvision.models import (
    ConvNeXtConfig,
    ModelConfig,
    ResNetConfig,
    ViTConfig,
    abstract_model,
    build_model,
    model_config,
)
from flaxvision.models.cnn import CNN
from flaxvision.models.vit import ViT
from flaxvision.weights.layouts import export_formats, verify_references

# Parameter counts the reference implementations report (timm / torchvision / transformers, 1000 classes
# unless the model's default says otherwise). vit_tiny_patch32_224 has no timm counterpart: computed by hand.
DOCUMENTED_PARAMS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_tiny_patch32_224": 6_131_560,
    "vit_small_patch16_224": 22_050_664,
    "vit_small_patch32_224": 22_878_952,
    "vit_base_patch16_224": 86_567_656,  # = google/vit-base-patch16-224
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    "vit_large_patch32_224": 306_535_400,
    "resnet18": 11_689_512,
    "resnet18_cifar": 11_173_962,  # 10 classes
    "cnn": 824_458,  # 10 classes, 28 x 28 x 1
    # timm's counts (sum of numel of timm.create_model(name, pretrained=False)), 1000 classes:
    "deit_base_distilled_patch16_224": 87_338_192,
    "deit3_small_patch16_224": 22_059_496,
    "deit3_base_patch16_224": 86_585_320,
    "vit_small_patch14_dinov2": 22_441_192,
    "vit_base_patch14_dinov2": 87_348_712,
    "vit_large_patch14_dinov2": 305_392_616,
    "vit_small_patch14_reg4_dinov2": 22_442_344,
    "vit_base_patch14_reg4_dinov2": 87_351_016,
    "vit_base_patch16_clip_224": 86_568_424,
    "vit_base_patch16_siglip_224": 93_653_224,
    "eva02_tiny_patch14_224": 5_695_144,
    "eva02_small_patch14_224": 22_006_120,
    "eva02_base_patch14_224": 86_527_720,
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
}

ALL_MODELS = flaxvision.list_models()
SIZE_FIELDS = {"num_classes", "img_size", "patch_size", "width", "depth", "num_heads", "mlp_dim", "stage_depths",
               "stage_widths", "layer_norm_eps"}  # fmt: skip


def _architecture_kind(name: str) -> tuple:
    """A name's family and options, sizes aside: names of the same kind run the same code."""
    config = model_config(name)
    return (type(config).__name__, *((f.name, getattr(config, f.name)) for f in dataclasses.fields(config) if f.name not in SIZE_FIELDS))


# One name per kind (the first in sorted order): every code path, each compiled once.
KINDS = list({_architecture_kind(n): n for n in reversed(ALL_MODELS)}.values())


def small_variant(name: str, **kw) -> Any:
    """The registered model at its real width, made cheap for CPU tests: small images, shallow ViTs and CNNs."""
    config = model_config(name, **kw)
    if isinstance(config, ViTConfig):
        return dataclasses.replace(config, img_size=2 * config.patch_size, depth=2)
    if isinstance(config, ConvNeXtConfig):  # one block per stage at the real widths
        return dataclasses.replace(config, img_size=32, depths=(1,) * len(config.depths))
    if isinstance(config, ResNetConfig):  # at most two blocks per stage (ResNet-18 as it is), 32 px
        return dataclasses.replace(config, img_size=32, stage_depths=tuple(min(d, 2) for d in config.stage_depths))
    if config.img_size > 64:
        return dataclasses.replace(config, img_size=64)
    return config


def images(config, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((batch, config.img_size, config.img_size, config.in_chans)), jnp.float32)


def test_registry_has_every_family():
    names = set(ALL_MODELS)
    for size in ("tiny", "small", "base", "large"):
        for patch in (16, 32):
            assert f"vit_{size}_patch{patch}_224" in names
    assert {"resnet18", "resnet18_cifar", "cnn"} <= names
    assert flaxvision.list_models("vit_*_patch32_*") == [n for n in ALL_MODELS if n.startswith("vit") and "patch32" in n]


@pytest.mark.parametrize("name", KINDS)
def test_parameter_count(name):
    """The formula equals the built module, once per kind (the sizes of the other names are the same polynomial)."""
    config = model_config(name)
    built = abstract_model(config).num_params()  # real module, shape-only weights
    assert config.param_count() == built
    assert flaxvision.model_info(name)["params"] == built


@pytest.mark.parametrize("name", sorted(DOCUMENTED_PARAMS))
def test_documented_parameter_counts(name):
    assert model_config(name).param_count() == flaxvision.model_info(name)["params"] == DOCUMENTED_PARAMS[name]


@pytest.mark.parametrize("name", KINDS)
def test_forward_shape_dtype_finite(name):
    config = small_variant(name, num_classes=7)
    model = build_model(config)
    model.eval()
    logits = nnx.jit(lambda m, x: m(x))(model, images(config))
    assert logits.shape == (4, 7)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.std(logits)) > 0  # not a constant function of the input


@pytest.mark.parametrize("name", KINDS)
def test_a_few_steps_reduce_the_loss(name):
    config = small_variant(name, num_classes=4)
    model = build_model(config, seed=1)
    x, y = images(config, batch=8, seed=1), jnp.arange(8) % 4
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(8)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def _forward_twice(model, x):
    f = nnx.jit(lambda m, x: m(x))
    return f(model, x), f(model, x)


def test_vit_dropout_and_drop_path_follow_mode():
    config = dataclasses.replace(small_variant("vit_tiny_patch16_224"), dropout_rate=0.1, drop_path_rate=0.2)
    model, x = build_model(config), images(config)
    train_a, train_b = _forward_twice(model, x)
    assert not np.allclose(train_a, train_b)  # fresh dropout masks each call
    model.eval()
    eval_a, eval_b = _forward_twice(model, x)
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, eval_a)


def test_vit_without_dropout_is_deterministic_in_train_mode():
    config = small_variant("vit_tiny_patch16_224")
    model, x = build_model(config), images(config)
    train_a, _ = _forward_twice(model, x)
    model.eval()
    eval_a, _ = _forward_twice(model, x)
    np.testing.assert_allclose(train_a, eval_a, rtol=1e-6, atol=1e-6)


def test_resnet_batchnorm_follows_mode():
    config = small_variant("resnet18_cifar")
    model, x = build_model(config), images(config)
    stats_before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    train_logits = nnx.jit(lambda m, x: m(x))(model, x)
    stats_after = nnx.state(model, nnx.BatchStat)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), stats_before, stats_after))
    assert all(moved)  # every running mean/var was updated in train mode
    model.eval()
    eval_a, eval_b = _forward_twice(model, x)
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_logits, eval_a)  # batch statistics vs running statistics
    frozen = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.array, nnx.state(model, nnx.BatchStat)))


def test_cnn_has_no_mode_dependence():
    model = flaxvision.create_model("cnn")
    x = images(model.config)
    train_a, _ = _forward_twice(model, x)
    model.eval()
    eval_a, _ = _forward_twice(model, x)
    np.testing.assert_array_equal(train_a, eval_a)


def test_drop_path_drops_whole_samples():
    from flaxvision.models.vit_layers import Block

    cfg = ViTConfig.tiny(img_size=32)
    block = Block(cfg, drop_path_rate=0.5, dtype=jnp.float32, rngs=nnx.Rngs(0))
    block.attn.eval()  # only stochastic depth stays random
    block.mlp.eval()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 5, cfg.width)), jnp.float32)
    attn_branch = block.attn(block.norm1(x))
    h = x + block.drop_path1(attn_branch)
    delta = np.asarray(h - x)
    # Each sample's branch is either dropped entirely or kept entirely, scaled by 1 / keep_prob.
    dropped = np.all(delta == 0, axis=(1, 2))
    kept = np.all(np.isclose(delta, 2 * np.asarray(attn_branch), atol=1e-6), axis=(1, 2))
    assert np.all(np.logical_or(dropped, kept))
    assert 10 < dropped.sum() < 54


def test_patch_embedding_equals_strided_convolution():
    from flaxvision.models.vit_layers import PatchEmbed

    embed = PatchEmbed(4, 3, 8, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 12, 3)), jnp.float32)
    conv = jax.lax.conv_general_dilated(
        x, embed.kernel[...], window_strides=(4, 4), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert embed.bias is not None
    expected = (conv + embed.bias[...][None, None, None, :]).reshape(2, 12, 8)
    np.testing.assert_allclose(embed(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18", "cnn"])
def test_flop_count_matches_xla(name):
    """The analytic count agrees with XLA's own count of the compiled forward (which adds elementwise ops)."""
    # XLA counts only the multiply-adds that do not touch convolution padding; at these sizes that is a few %.
    config = dataclasses.replace(small_variant(name, num_classes=10), img_size={"resnet18": 224, "cnn": 56}.get(name, 64))
    if hasattr(config, "scan_blocks"):  # XLA's cost analysis counts a loop body once: count the unrolled encoder
        config = dataclasses.replace(config, scan_blocks=False)
    model = build_model(config)
    model.eval()
    graphdef, state = nnx.split(model)
    lowered = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images(config, batch=1))
    analysis = lowered.cost_analysis()
    assert analysis is not None, "XLA gave no cost analysis"
    xla_flops = analysis["flops"]
    assert 0.9 * xla_flops <= config.forward_flops() <= 1.08 * xla_flops


def test_bfloat16_computes_in_bf16_with_float32_params():
    config = small_variant("vit_tiny_patch16_224", dtype="bfloat16")
    model = build_model(config)
    model.eval()
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = model(images(config))
    assert logits.dtype == jnp.float32
    features = model.features(images(config))
    assert features.dtype == jnp.bfloat16
    model32 = build_model(dataclasses.replace(config, dtype="float32"))
    model32.eval()
    np.testing.assert_allclose(logits, model32(images(config)), atol=0.15)  # same weights, bf16 rounding only


def test_gelu_is_exact_erf():
    from flaxvision.models.vit_layers import ACTIVATIONS

    x = jnp.linspace(-4, 4, 101)
    exact = 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))
    np.testing.assert_allclose(ACTIVATIONS["gelu"](x), exact, atol=1e-6)


def test_avg_pool_head_uses_fc_norm_like_timm():
    config = small_variant("vit_tiny_patch16_224", global_pool="avg")
    assert config.use_fc_norm
    model = build_model(config)
    model.eval()
    x = images(config)
    tokens = model.tokens(x)  # no final norm before pooling when fc_norm
    expected = model.norm(tokens[:, 1:].mean(axis=1))
    np.testing.assert_allclose(model.features(x), expected, rtol=1e-6, atol=1e-6)


def test_seed_controls_initialisation():
    a = flaxvision.create_model("cnn", seed=0)
    b = flaxvision.create_model("cnn", seed=0)
    c = flaxvision.create_model("cnn", seed=1)
    a, b, c = cast(CNN, a), cast(CNN, b), cast(CNN, c)
    np.testing.assert_array_equal(a.conv1.kernel[...], b.conv1.kernel[...])
    assert not np.allclose(a.conv1.kernel[...], c.conv1.kernel[...])


def test_any_image_size_divisible_by_patch():
    model = cast(ViT, flaxvision.create_model("vit_tiny_patch16_224", img_size=48, depth=1, num_classes=3))
    assert model.pos_embed.shape == (1, 10, 192)
    assert model(jnp.zeros((1, 48, 48, 3))).shape == (1, 3)


def test_one_channel_models():
    for name, size in (("vit_tiny_patch16_224", 32), ("resnet18_cifar", 32), ("cnn", 20)):
        extra: dict[str, Any] = {"depth": 1} if "vit" in name else {}
        model = flaxvision.create_model(name, in_chans=1, img_size=size, num_classes=2, **extra)
        model.eval()
        assert model(jnp.zeros((2, size, size, 1))).shape == (2, 2)


# ---- bad input: a clear error before any compute ------------------------------------------------------------


def test_unknown_model_suggests_close_names():
    with pytest.raises(flaxvision.FlaxvisionError, match=r"unknown model 'vit_bse_patch16_224'.*vit_base_patch16_224"):
        flaxvision.create_model("vit_bse_patch16_224")
    assert issubclass(flaxvision.FlaxvisionError, ValueError)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"img_size": 100}, r"img_size 100 is not divisible by patch_size 16.*96"),
        ({"num_classes": 0}, r"num_classes must be an integer >= 1, got 0"),
        ({"in_chans": 0}, r"in_chans must be an integer from 1 to 64.*got 0"),
        ({"dtype": "int8"}, r"dtype must be one of .*'int8'"),
        ({"global_pool": "max"}, r"global_pool must be one of token, avg, map, token_avg, got 'max'"),
        ({"drop_path_rate": 1.5}, r"drop_path_rate must be in \[0, 1\)"),
        ({"depthh": 2}, r"no option 'depthh'.*did you mean depth"),
    ],
)
def test_bad_vit_config_is_a_clear_error(kwargs, message, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("the model must not be built for an invalid config")

    monkeypatch.setattr("flaxvision.models.factory.build_model", no_build)
    with pytest.raises(flaxvision.ConfigError, match=message):
        flaxvision.create_model("vit_base_patch16_224", **kwargs)


def test_bad_resnet_and_cnn_configs():
    with pytest.raises(flaxvision.ConfigError, match="img_size 8 is smaller than the network's total stride 16"):
        flaxvision.create_model("resnet18_cifar", img_size=8)
    with pytest.raises(flaxvision.ConfigError, match="stem must be one of"):
        flaxvision.create_model("resnet18", stem="tiny")
    with pytest.raises(flaxvision.ConfigError, match="num_classes"):
        flaxvision.create_model("cnn", num_classes=-3)


def test_wrong_input_shape_is_a_clear_error():
    model = flaxvision.create_model("cnn")
    with pytest.raises(flaxvision.ConfigError, match=r"expects images of shape \(batch, 28, 28, 1\).*got \(2, 32, 32, 1\)"):
        model(jnp.zeros((2, 32, 32, 1)))


@pytest.mark.parametrize("scan_blocks, remat", [(True, "none"), (True, "dots"), (True, "full"), (False, "full")])
def test_scanned_encoder_matches_the_unrolled_loop(scan_blocks, remat):
    """Scanning the blocks (the default) and remat change how the encoder runs, never what it computes."""
    config = ViTConfig(num_classes=5, img_size=32, patch_size=8, width=64, depth=3, num_heads=2, mlp_dim=128,
                       dropout_rate=0.1, drop_path_rate=0.3)  # fmt: skip
    x = images(config, batch=8)

    def run(scan_blocks: bool, remat: str):
        model = build_model(dataclasses.replace(config, scan_blocks=scan_blocks, remat=remat))
        model.eval()
        eval_logits = model(x)
        model.train()
        nnx.reseed(model, dropout=3)
        first, second = model(x), model(x)  # the RNG counters advance: new dropout / drop-path masks each call
        nnx.reseed(model, dropout=3)
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        return eval_logits, first, second, jax.tree.leaves(nnx.state(grads, nnx.Param))

    unrolled, scanned = run(False, "none"), run(scan_blocks, remat)
    assert not np.allclose(unrolled[1], unrolled[2])
    for a, b in zip(unrolled[:3], scanned[:3], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert len(unrolled[3]) == len(scanned[3])
    for a, b in zip(unrolled[3], scanned[3], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_scanned_encoder_does_not_mutate_model_state_in_eval():
    """In eval mode the scan touches no RNG state, so a model captured by jax.jit can be called (predict does)."""
    model = build_model(small_variant("vit_tiny_patch16_224", dropout_rate=0.1))
    model.eval()
    logits = jax.jit(lambda x: model(x))(images(model.config))
    np.testing.assert_allclose(logits, model(images(model.config)), atol=1e-5)


def test_unknown_remat_policy_is_a_clear_error():
    with pytest.raises(flaxvision.ConfigError, match=r"remat must be one of none, dots, full, got 'some'"):
        ViTConfig(remat="some")


# ---- layering and capabilities ---------------------------------------------------------------------------------

SRC = Path(flaxvision.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every flaxvision module an `import` anywhere in the file names (function-level ones included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in out if name.startswith("flaxvision")}


def test_registry_is_a_leaf():
    imported = _imports(SRC / "models" / "registry.py")
    assert imported <= {"flaxvision.errors", "flaxvision.preprocessing", "flaxvision.errors.ConfigError",
                        "flaxvision.errors.FlaxvisionError", "flaxvision.errors.did_you_mean",
                        "flaxvision.preprocessing.Preprocessing"}, imported  # fmt: skip


def test_models_and_weights_import_without_cycles():
    """A walk over the import graph of models/ and weights/ (function-level imports count) finds no cycle."""
    files = {_module_name(p): p for d in ("models", "weights") for p in (SRC / d).glob("*.py")}
    known = {_module_name(p) for p in SRC.rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in known and m != name} for name, path in files.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = [name for name in graph if name in reach(name)]
    assert not cycles, cycles
    assert not any(m.startswith("flaxvision.weights") for m in reach("flaxvision.models.registry"))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_config_has_the_capabilities(name):
    config = model_config(name)
    assert isinstance(config, ModelConfig)
    formats = export_formats(config)
    assert formats[-1] == "flaxvision" and isinstance(formats, tuple)
    assert config.train_memory_bytes(8) > config.train_memory_bytes(1) > 4 * config.param_count()
    assert config.train_memory_bytes(8, optimizer_slots=0) < config.train_memory_bytes(8)


def test_vit_layers_and_formats():
    config = model_config("vit_tiny_patch16_224", depth=3)
    assert config.num_layers() == 3 and config.position_grid() == 14
    assert [config.layer_index(p) for p in ("pos_embed", "patch_embed.kernel", "blocks.0.attn.qkv.kernel",
                                            "blocks.2.mlp.fc2.bias", "norm.scale", "head.kernel")] == [0, 0, 1, 3, 4, 4]  # fmt: skip
    assert export_formats(config) == ("transformers", "timm", "npz", "flaxvision")
    assert verify_references(config) == ("timm", "transformers")
    avg = dataclasses.replace(config, global_pool="avg")  # ViTForImageClassification and .npz hold a CLS head only
    assert export_formats(avg) == ("timm", "flaxvision") and verify_references(avg) == ("timm",)


def test_a_missing_capability_names_the_model():
    from flaxvision.train.config import TrainConfig
    from flaxvision.train.optim import make_optimizer, trainable_predicate

    resnet = model_config("resnet18", num_classes=5)
    assert resnet.num_layers() == 0 and resnet.position_grid() is None
    params = nnx.state(abstract_model(resnet), nnx.Param)
    with pytest.raises(flaxvision.ConfigError, match=r"layer_decay=0.75 needs a model with layers .*; resnet18 has none"):
        make_optimizer(TrainConfig(layer_decay=0.75), params, resnet, 10)
    with pytest.raises(flaxvision.ConfigError, match=r"train_only='last:2' needs a model with layers .*; resnet18 has none"):
        trainable_predicate(TrainConfig(train_only="last:2"), resnet)
    with pytest.raises(flaxvision.ConfigError, match=r"layer_decay=0.5 needs a model with layers .*; a ResNet has none"):
        make_optimizer(TrainConfig(layer_decay=0.5), params, dataclasses.replace(resnet, stage_depths=(1, 1, 1, 1)), 10)


def test_head_inits_and_param_path_are_shared():
    from flaxvision.models import HEAD_INITS, param_path

    assert HEAD_INITS == ("zeros", "random")
    assert param_path(("blocks", 0, "attn", "qkv", "kernel")) == "blocks.0.attn.qkv.kernel"


def _xla_train_step_bytes(config, batch: int) -> int:
    """temp + argument bytes of the compiled train step (AdamW, everything trained), as the trainer compiles it."""
    from flaxvision.train.step import make_train_step, split_model

    parts, state = split_model(abstract_model(config), nnx.Param)
    tx = optax.adamw(1e-3)
    state = state.replace(opt_state=jax.eval_shape(tx.init, state.params))
    step = make_train_step(parts, tx, preprocess=lambda x, key: x.astype(jnp.float32), seed=0)
    shape = (batch, config.img_size, config.img_size, config.in_chans)
    images = {"image": jax.ShapeDtypeStruct(shape, jnp.float32), "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    memory = jax.jit(step, donate_argnums=0).lower(abstract, images).compile().memory_analysis()
    if memory is None:
        raise RuntimeError("XLA gave no memory analysis for the compiled train step")
    return memory.temp_size_in_bytes + memory.argument_size_in_bytes


@pytest.mark.parametrize(
    "name, batch, kw",
    [
        ("vit_tiny_patch16_224", 4, dict(num_classes=10, img_size=64, patch_size=4, depth=2)),  # 257 tokens: scores matter
        ("cnn", 64, {}),
    ],
)
def test_memory_estimate_is_within_2x_of_xla(name, batch, kw):
    config = model_config(name, **kw)
    estimate, compiled = config.train_memory_bytes(batch), _xla_train_step_bytes(config, batch)
    assert compiled / 2 <= estimate <= 2 * compiled, (estimate, compiled)


def test_memory_estimate_grows_with_tokens_and_remat():
    small = model_config("vit_tiny_patch16_224")  # 197 tokens
    many = model_config("vit_tiny_patch16_224", patch_size=4)  # 3,137 tokens
    assert many.num_patches + 1 == 3137
    assert small.train_memory_bytes(32) < 3e9 and 20e9 < many.train_memory_bytes(32) < 200e9  # tens of GB
    by_remat = [dataclasses.replace(many, remat=r).train_memory_bytes(32) for r in ("full", "dots", "none")]
    assert by_remat == sorted(by_remat) and by_remat[0] < by_remat[2] / 3
    assert dataclasses.replace(many, dtype="bfloat16").train_memory_bytes(32) < many.train_memory_bytes(32)
