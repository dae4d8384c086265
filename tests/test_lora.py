"""LoRA: adapters on a ViT (fused qkv parts, scan/unrolled, bf16), merging, training only adapters + head, the
adapter on disk and back onto its base, a LoRA run's model/ and adapter/, and the command line."""

import json
import logging
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxvision
from flaxvision.models.lora import LoRALinear, adapter_state, apply_lora, is_lora_path, lora_spec, merge_lora
from flaxvision.train import TrainConfig, Trainer, fit, recipe
from flaxvision.train.optim import _layer_scales, trainable_predicate
from flaxvision.weights import load_adapter, save_adapter
from tests.helpers import (
    CLASS_NAMES,
    TINY_CLI,
    TRAINER_VIT,
    batches,
    colour_data,
    error_lines,
    run_cli,
    short_failure,
    small_config,
    trainer_vit,
)


def flat(model, kind=nnx.Param) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def inputs(n: int = 3, size: int = 16) -> jax.Array:
    return jax.random.uniform(jax.random.key(7), (n, size, size, 3), minval=-1.0, maxval=1.0)


def randomise_lora(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every LoRA parameter (B included: it starts at zero) random values, as training would."""
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        var.set_value(scale * jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), var.get_value().shape))


@nnx.jit
def _forward(model, x):
    return model(x)


def logits(model, x, *, train: bool = False) -> np.ndarray:
    model.train() if train else model.eval()
    out = np.asarray(_forward(model, jnp.asarray(x)))
    model.eval()
    return out


# ---- the adapted model -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets, scan", [("q,v", True), ("qkv", True), ("proj,fc1,fc2", True), ("q,v", False)])
def test_merged_logits_equal_the_unmerged(targets, scan):
    model = trainer_vit(scan_blocks=scan)
    x = inputs()
    base = logits(model, x)
    apply_lora(model, rank=4, alpha=8, targets=targets)
    randomise_lora(model)
    # In training mode (no dropout configured) the encoder runs as a remat'ed lax.scan over the blocks (scan) or a
    # loop of nnx.remat'ed blocks; in eval mode always unrolled.
    unmerged = logits(model, x)
    np.testing.assert_allclose(logits(model, x, train=True), unmerged, atol=1e-6)
    assert np.abs(unmerged - base).max() > 1e-3  # the adapters do change the function
    merged = merge_lora(model)
    assert lora_spec(merged) is None and not any(is_lora_path(k) for k in flat(merged))
    assert flat(merged).keys() == flat(trainer_vit()).keys()  # a plain ViT: saves in every format
    np.testing.assert_allclose(logits(merged, x), unmerged, atol=1e-5, rtol=0)
    assert lora_spec(model) is not None  # merging leaves the adapted model as it was


def test_adapters_start_as_the_base_and_follow_peft_layout():
    model = cast(Any, trainer_vit())
    x = inputs()
    base, base_params = logits(model, x), flat(model)
    apply_lora(model, rank=4, targets="q,v", seed=3)
    np.testing.assert_array_equal(logits(model, x), base)  # B = 0: exactly the base's logits
    params = flat(model)
    lora = {k: v for k, v in params.items() if is_lora_path(k)}
    # q and v of the fused qkv: one adapter each (PEFT's query/value), A (D, r) Kaiming-uniform, B (r, D) zeros.
    assert sorted(lora) == sorted(f"blocks.{i}.attn.qkv.lora_{p}.lora_{m}" for i in range(2) for p in "qv" for m in "ab")
    for name, value in lora.items():
        if name.endswith("lora_a"):
            assert value.shape == (32, 4) and 0 < np.abs(value).max() <= 1 / np.sqrt(32) and value.std() > 0.05
        else:
            assert value.shape == (4, 32) and not value.any()
    for name, value in base_params.items():  # the base weights are the same arrays at the same paths
        np.testing.assert_array_equal(params[name], value)
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear) and isinstance(model.blocks[0].attn.qkv, nnx.Linear)
    assert not isinstance(model.blocks[0].attn.proj, LoRALinear)
    assert lora_spec(model) == flaxvision.models.lora.LoRASpec(4, 4.0, ("q", "v"), 0.0)
    # Only the q and v columns move: k's third of the qkv output is the base's.
    randomise_lora(model)
    qkv = model.blocks[0].attn.qkv
    tokens = jax.random.normal(jax.random.key(1), (2, 5, 32))
    delta = np.asarray(qkv(tokens) - nnx.Linear.__call__(qkv, tokens))
    assert np.abs(delta[..., :32]).min() > 0 and not delta[..., 32:64].any() and np.abs(delta[..., 64:]).max() > 0
    with pytest.raises(flaxvision.FlaxvisionError, match="already carries LoRA adapters"):
        apply_lora(model, rank=4)


def test_bfloat16_adapters_compute_in_bfloat16_and_merge():
    model = cast(Any, trainer_vit(dtype="bfloat16"))
    x = inputs()
    base = logits(model, x)
    apply_lora(model, rank=4, targets="qkv,fc2", dropout=0.1)
    np.testing.assert_array_equal(logits(model, x), base)
    randomise_lora(model)
    tokens = jnp.ones((1, 3, 32), jnp.bfloat16)
    assert model.blocks[0].attn.qkv(tokens).dtype == jnp.bfloat16
    assert all(v.dtype == np.float32 for v in flat(model).values())  # float32 master weights
    np.testing.assert_allclose(logits(merge_lora(model), x), logits(model, x), atol=0.05)
    assert np.abs(logits(model, x, train=True) - logits(model, x)).max() > 1e-3  # the adapters' dropout, training


def test_only_vits_are_adaptable():
    cnn = flaxvision.create_model("cnn", num_classes=4)
    with pytest.raises(flaxvision.FlaxvisionError, match="LoRA adapts ViT-family models.*cnn"):
        apply_lora(cnn, rank=4)
    with pytest.raises(flaxvision.FlaxvisionError, match="qkv already covers"):
        apply_lora(trainer_vit(), rank=4, targets="qkv,q")
    with pytest.raises(flaxvision.FlaxvisionError, match="'attn' is not one of"):
        apply_lora(trainer_vit(), rank=4, targets="attn")


# ---- training ----------------------------------------------------------------------------------------------------


def test_training_changes_only_the_adapters_and_the_head(cpu_devices):
    # FSDP over the 8 CPU devices with a tiny threshold, so that sharded frozen and trained arrays are exercised.
    config = small_config(lora_rank=4, lora_alpha=8, lora_targets="q,v", model_overrides={"depth": 2},
                          param_sharding="fsdp", fsdp_min_size=64, layer_decay=0.5)  # fmt: skip
    model = recipe.with_lora(config, trainer_vit())
    before = flat(model)
    trainer = Trainer(config, model, steps_per_epoch=3)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainer.state.params)}
    lora_names = {k for k in before if is_lora_path(k)}
    assert names == lora_names | {"head.kernel", "head.bias"}
    # Counted: 2 blocks x 2 adapters (q, v) x (32 x 4 + 4 x 32), and the head 32 x 4 + 4.
    assert sum(x.size for x in jax.tree.leaves(trainer.state.params)) == 2 * 2 * 256 + 132
    frozen = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainer.state.frozen)}
    assert frozen == set(before) - names and "blocks.0.attn.qkv.kernel" in frozen
    # AdamW's two moments for the trained parameters only (plus step counters).
    n_opt = sum(x.size for x in jax.tree.leaves(trainer.state.opt_state))
    assert 2 * 1156 <= n_opt <= 2 * 1156 + 8
    scales = {".".join(map(str, p)): float(v.get_value()) for p, v in
              nnx.to_flat_state(_layer_scales(trainer.state.params, model.config, 0.5))}  # fmt: skip
    assert scales["blocks.0.attn.qkv.lora_q.lora_a"] == 0.25 and scales["blocks.1.attn.qkv.lora_v.lora_b"] == 0.5
    assert scales["head.kernel"] == 1.0
    xt, yt = colour_data(32, 0)
    with short_failure("LoRA training steps"):
        for _ in range(3):
            trainer.state = trainer.train_step(trainer.state, trainer.stage.put({"image": xt, "label": yt}))
    assert trainer.read_train_metrics()["first_bad_step"] == -1
    after = flat(trainer.current_model())
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == names  # every adapter (B from zero, A through B) and the head moved; nothing else did


def test_freeze_applies_on_top_and_train_only_is_refused():
    config = small_config(lora_rank=4, lora_targets="qkv", freeze=r"blocks\.0\.")
    trainable = trainable_predicate(config, trainer_vit().config)
    assert trainable(("blocks", 1, "attn", "qkv", "lora", "lora_a")) and trainable(("head", "kernel"))
    assert not trainable(("blocks", 0, "attn", "qkv", "lora", "lora_a"))
    assert not trainable(("blocks", 1, "attn", "qkv", "kernel")) and not trainable(("norm", "scale"))
    with pytest.raises(flaxvision.ConfigError, match="train_only='head': LoRA already trains only"):
        small_config(lora_rank=4, train_only="head")
    with pytest.raises(flaxvision.ConfigError, match="lora_targets='q,v': goes with --lora-rank"):
        small_config(lora_targets="q,v")
    preset_like = TrainConfig(lora_rank=16, lora_alpha=16, lora_targets="q,v")  # the PEFT guide's setting
    assert preset_like.lora_targets == "q,v"
    # The recipe checks its targets with the adapters' own rule (models.lora.parse_targets), as one line.
    for bad, why in (("attn", "'attn' is not one of"), ("qkv,q", "qkv already covers")):
        with pytest.raises(flaxvision.ConfigError, match=f"lora_targets='{bad}': .*{why}"):
            small_config(lora_rank=4, lora_targets=bad)


def test_a_model_with_other_adapters_than_the_recipe_is_refused():
    adapted = apply_lora(trainer_vit(), rank=4, targets="q,v")
    with pytest.raises(flaxvision.ConfigError, match="has no --lora-rank; pass --lora-rank 4 --lora-targets q,v"):
        recipe.with_lora(small_config(), adapted)
    with pytest.raises(flaxvision.ConfigError, match="differ from the recipe's"):
        recipe.with_lora(small_config(lora_rank=8, lora_targets="q,v"), adapted)
    assert recipe.with_lora(small_config(lora_rank=4, lora_targets="v,q"), adapted) is adapted


# ---- the adapter on disk -----------------------------------------------------------------------------------------


def test_adapter_round_trip_onto_a_fresh_base(tmp_path, caplog):
    base_dir = flaxvision.save_pretrained(trainer_vit(), tmp_path / "base", format="flaxvision")
    model = apply_lora(flaxvision.load_pretrained(base_dir), rank=4, alpha=2, targets="q,v,fc1")
    randomise_lora(model)
    model.head.kernel.set_value(model.head.kernel.get_value() + 0.5)  # a trained head
    model.label_names = tuple(CLASS_NAMES)
    x = inputs()
    expected = logits(model, x)
    out = save_adapter(model, tmp_path / "adapter", base=str(base_dir))
    info = json.loads((out / "adapter_config.json").read_text())
    assert info["format"] == "flaxvision-lora" and info["base_model"] == str(base_dir.resolve())
    assert info["lora"] == {"rank": 4, "alpha": 2.0, "targets": ["q", "v", "fc1"], "dropout": 0.0}
    assert info["label_names"] == CLASS_NAMES and info["config"]["width"] == 32 and info["preprocessing"]["img_size"] == 16
    from safetensors.numpy import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    assert set(tensors) == set(adapter_state(model)) and {"head.kernel", "head.bias"} <= set(tensors)
    assert all(is_lora_path(k) or k.startswith("head.") for k in tensors)  # the frozen base is not in it
    for source in (None, base_dir, trainer_vit()):  # the recorded base, a path, a freshly built model
        with caplog.at_level(logging.WARNING):
            loaded = load_adapter(out, base=source)
        assert lora_spec(loaded) == lora_spec(model) and loaded.label_names == tuple(CLASS_NAMES)
        np.testing.assert_allclose(logits(loaded, x), expected, atol=1e-6)
    assert not [r for r in caplog.records if "differ from those it was trained on" in r.getMessage()]
    load_adapter(out, base=trainer_vit(seed=5))  # same architecture, other weights: loads, with a warning
    assert any("differ from those it was trained on" in r.getMessage() for r in caplog.records)


def test_an_adapter_on_the_wrong_base_is_one_error(tmp_path):
    model = apply_lora(trainer_vit(), rank=4, targets="qkv")
    out = save_adapter(model, tmp_path / "adapter", base=None)
    with pytest.raises(flaxvision.FlaxvisionError, match="trained on a model built from scratch"):
        load_adapter(out)
    offline = save_adapter(model, tmp_path / "hub-adapter", base="flaxvision-tests/no-such-base")
    with pytest.raises(flaxvision.FlaxvisionError, match="cannot reach the Hugging Face Hub to fetch 'flaxvision-tests/"):
        load_adapter(offline)  # the recorded base id goes through weights.hub (offline in the tests)
    for base, message in ((trainer_vit(mlp_dim=48), "mlp_dim 48 .base. vs 64"), (flaxvision.create_model("vit_tiny_patch16_224", **{**cast(dict[str, Any], TRAINER_VIT), "num_classes": 3}), "num_classes=4"),
                          (flaxvision.create_model("cnn", num_classes=4), "trained on a"),
                          (trainer_vit(depth=1), "depth 1 .base. vs 2")):  # fmt: skip
        with pytest.raises(flaxvision.FlaxvisionError, match=message) as err:
            load_adapter(out, base=base)
        assert "\n" not in str(err.value)
    # A tensor of the wrong shape (a damaged or foreign file): nothing is loaded.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(out / "adapter_model.safetensors")
    tensors["blocks.1.attn.qkv.lora.lora_b"] = np.zeros((4, 95), np.float32)
    del tensors["blocks.0.attn.qkv.lora.lora_a"]
    save_file(tensors, out / "adapter_model.safetensors")
    with pytest.raises(flaxvision.FlaxvisionError, match=r"missing \(1\): blocks.0.attn.qkv.lora.lora_a; shape mis"):
        load_adapter(out, base=trainer_vit())


def test_a_failed_adapter_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    model = apply_lora(trainer_vit(), rank=4)
    first = save_adapter(model, tmp_path / "adapter", base=None)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    randomise_lora(model)

    def fail(*_a, **_k):
        raise RuntimeError("killed")  # as a process that dies here: the directory is never renamed into place

    monkeypatch.setattr(flaxvision.weights.adapter.files, "write_json", fail)  # after the tensors were written
    with pytest.raises(RuntimeError, match="killed"):
        save_adapter(model, tmp_path / "adapter", base=None, overwrite=True)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary directory left
    with pytest.raises(flaxvision.FlaxvisionError, match="carries LoRA adapters, which format 'flaxvision' cannot"):
        flaxvision.save_pretrained(model, tmp_path / "plain", format="flaxvision")


# ---- a LoRA run, and the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA fine-tune (q,v, rank 4) of a pretrained tiny ViT on colour data: model/ merged and adapter/."""
    root = tmp_path_factory.mktemp("lora")
    base_dir = flaxvision.save_pretrained(trainer_vit(), root / "base", format="flaxvision")
    config = small_config(model=None, pretrained=str(base_dir), model_overrides={}, epochs=1, lora_rank=4,
                          lora_targets="q,v", lora_dropout=0.1)  # fmt: skip
    xt, yt = colour_data(64, 0)
    xv, yv = colour_data(32, 1)
    with short_failure("the LoRA fit"):
        result = fit(config, run_dir=root / "run", train_data=batches(xt, yt, 32), val_data=batches(xv, yv, 16),
                     class_names=CLASS_NAMES)  # fmt: skip
    return root, result, flat(flaxvision.load_pretrained(base_dir))


def test_a_lora_run_writes_the_merged_model_and_the_adapter(lora_run):
    root, result, base = lora_run
    run = root / "run"
    assert (run / "summary.json").is_file() and sorted(p.name for p in (run / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]  # fmt: skip
    info = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert info["base_model"] == str((root / "base").resolve()) and info["label_names"] == CLASS_NAMES
    x = inputs()
    trained = logits(result.model, x)  # the run's final model, with its adapters
    plain = flaxvision.load_pretrained(run / "model")
    assert lora_spec(plain) is None and plain.label_names == tuple(CLASS_NAMES)
    np.testing.assert_allclose(logits(plain, x), trained, atol=1e-5)
    np.testing.assert_allclose(logits(load_adapter(run / "adapter"), x), trained, atol=1e-6)
    after = flat(result.model)
    for name, value in base.items():  # the base weights trained on are bit-identical; the head was trained
        assert np.array_equal(after[name], value) == (not name.startswith("head.")), name


def test_predict_and_export_an_adapter_from_the_command_line(lora_run, tmp_path, capsys):
    import torch
    import transformers
    from PIL import Image

    root, result, _ = lora_run
    image = tmp_path / "red.png"
    Image.fromarray(colour_data(1, 3)[0][0]).save(image)
    outputs = []
    for source in (root / "run", root / "run" / "adapter"):
        code, out, err = run_cli(["predict", source, image, "--json"], capsys)
        assert code == 0, err
        outputs.append(json.loads(out)[0]["predictions"])
    assert outputs[0][0]["label"] == outputs[1][0]["label"]
    assert abs(outputs[0][0]["probability"] - outputs[1][0]["probability"]) < 1e-5
    code, _, err = run_cli(["export", root / "run" / "adapter", "--format", "timm", "--out", tmp_path / "no"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "pass --merge-lora" in err and not (tmp_path / "no").exists()
    base_dir = root / "base"
    code, _, err = run_cli(["export", base_dir, "--merge-lora", "--format", "npz", "--out", tmp_path / "no"], capsys)
    assert code == 2 and "holds no LoRA adapter" in err and not (tmp_path / "no").exists()
    for source in (root / "run" / "adapter", root / "run"):
        out = tmp_path / f"hf-{source.name}"
        code, _, err = run_cli(["export", source, "--merge-lora", "--format", "transformers", "--out", out], capsys)
        assert code == 0, err
        hf = transformers.ViTForImageClassification.from_pretrained(out).eval()
        x = np.array(inputs())  # a writable copy for torch
        with torch.no_grad():
            theirs = hf(torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
        np.testing.assert_allclose(theirs, logits(result.model, x), atol=1e-4)
    import timm

    code, _, err = run_cli(["export", root / "run" / "adapter", "--merge-lora", "--format", "timm", "--out",
                            tmp_path / "timm"], capsys)  # fmt: skip
    assert code == 0, err
    reference = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(theirs, logits(result.model, x), atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--lora-rank", "4", "--train-only", "head"], "train_only='head': LoRA already trains only the adapters"),
    (["--lora-rank", "4", "--model", "cnn", "--model-overrides", "{}"], "LoRA adapts ViT-family models"),
])  # fmt: skip
def test_bad_lora_options_are_one_line_with_exit_code_2(extra, message, tmp_path, capsys):
    code, _, err = run_cli(["train", *TINY_CLI, *extra, "--run-dir", tmp_path / "r"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_a_target_the_model_lacks_is_one_error():
    """EVA-02 base's SwiGLU MLP has fc1_g / fc1_x, not fc1: asking for fc1 names it instead of crashing."""
    model = flaxvision.create_model("eva02_base_patch14_224", depth=1, width=64, num_heads=2, mlp_dim=96, img_size=28, num_classes=3)
    with pytest.raises(flaxvision.FlaxvisionError, match=r"LoRA target\(s\) fc1: this model has no such layer \(mlp='swiglu'\)"):
        apply_lora(model, rank=2, targets="qkv,fc1")
    assert lora_spec(model) is None  # refused before any layer was adapted
