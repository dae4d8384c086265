"""Training engine: learning, exact resume after SIGKILL, freezing, accumulation, bf16, devices, NaN stop."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

import flaxvision
from flaxvision.train import Checkpointer, TrainConfig, Trainer, TrainingDiverged, fit, learning_rate_schedule
from flaxvision.train.optim import _decay_mask, _layer_scales, trainable_predicate
from flaxvision.train.step import cross_entropy
from tests.helpers import (
    TRAINER_VIT,
    batches,
    colour_data,
    flat_params,
    kill_once_checkpointed,
    metrics_records,
    resume_fit_process,
    trainer_vit,
)


def small_config(**kw) -> TrainConfig:
    base = dict(model="vit_tiny_patch16_224", epochs=1, batch_size=32, optimizer="adamw", lr=3e-3, log_every=2,
                progress=False, model_overrides=dict(TRAINER_VIT))  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_learnable_task_reaches_high_accuracy(tmp_path):
    xt, yt = colour_data(512, 0)
    xv, yv = colour_data(200, 1)
    result = fit(
        small_config(epochs=3, warmup_steps=5, schedule="cosine", weight_decay=0.05), run_dir=tmp_path,
        model=trainer_vit(), train_data=batches(xt, yt, 32), val_data=batches(xv, yv, 64),
        class_names=["red", "green", "blue", "grey"],
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    # Chance is 0.25; the colour task is solved well inside 48 steps.
    assert summary["final_val_accuracy"] >= 0.9
    assert summary["best_val_accuracy"] >= summary["final_val_accuracy"] - 1e-9
    assert set(summary) >= {"best_val_accuracy", "final_val_accuracy", "final_val_loss", "epochs", "steps",
                            "wall_seconds", "train_images_per_second"}  # fmt: skip
    assert summary["steps"] == 48 and summary["epochs"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [16, 32, 48] and all(r["val_count"] == 200 for r in evals)
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert {"loss", "accuracy", "lr", "images_per_second", "step", "epoch"} <= set(train[0])
    config = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(config["train_config"]) == small_config(epochs=3, warmup_steps=5, schedule="cosine", weight_decay=0.05)
    assert config["class_names"] == ["red", "green", "blue", "grey"]
    # The final model is exported with its label names and reloads to the same predictions.
    assert (tmp_path / "model").is_dir() and any((tmp_path / "model").iterdir())
    assert result.model.label_names == ("red", "green", "blue", "grey")


# The SIGKILL run trains with an EMA of the weights and mixup + CutMix per example on (train.ema, train.mixup): one
# kill test covers the plain state and the state those options add.
SIGKILL_RECIPE = {"ema_decay": 0.9, "ema_warmup": True, "mixup": 0.8, "cutmix": 1.0, "mixup_mode": "elem"}


def test_resume_after_sigkill_is_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    child = resume_fit_process(straight, 16, "fresh", recipe=SIGKILL_RECIPE)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err

    # Kill a paced run (0.1 s per batch) with SIGKILL once it has checkpointed step 6 of 16.
    kill_once_checkpointed(killed, 16, 6, SIGKILL_RECIPE)

    # A write that was cut off (what a kill during a save leaves): a later step's temporary directory.
    latest = max(int(p.name) for p in (killed / "checkpoints").glob("*") if p.name.isdigit())
    partial = killed / "checkpoints" / f"{latest + 1}.orbax-checkpoint-tmp-1234567"
    shutil.copytree(killed / "checkpoints" / str(latest), partial)
    for f in partial.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    child = resume_fit_process(killed, 16, "resume", recipe=SIGKILL_RECIPE)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert f"resumed from step {latest}" in out

    for weights in ("model", "model_ema"):  # the raw weights and their EMA
        a = load_file(str(straight / weights / "model.safetensors"))
        b = load_file(str(killed / weights / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{weights}: {key}")  # bitwise on CPU
    assert metrics_records(straight) == metrics_records(killed)


def test_existing_run_is_not_overwritten(tmp_path):
    xt, yt = colour_data(64, 0)
    fit(small_config(), run_dir=tmp_path, model=trainer_vit(), train_data=batches(xt, yt, 32))
    with pytest.raises(flaxvision.FlaxvisionError, match="already holds a run; pass --resume .* or --overwrite"):
        fit(small_config(), run_dir=tmp_path, model=trainer_vit(), train_data=batches(xt, yt, 32))
    result = fit(small_config(lr=1e-3), run_dir=tmp_path, model=trainer_vit(), train_data=batches(xt, yt, 32), overwrite=True)
    assert result.summary["steps"] == 2


def test_frozen_parameters_are_bit_identical_and_have_no_optimizer_state(tmp_path):
    xt, yt = colour_data(128, 0)
    model = trainer_vit()
    before = flat_params(model)
    result = fit(small_config(train_only="last:1", freeze=r"blocks\.1\.mlp"), run_dir=tmp_path, model=model,
                 train_data=batches(xt, yt, 32))  # fmt: skip
    after = flat_params(result.model)
    trained = {k for k in before if not np.array_equal(before[k], after[k])}
    assert trained and all(k.startswith(("head.", "norm.", "blocks.1.")) for k in trained)
    assert not any(k.startswith("blocks.1.mlp") for k in trained)
    for k in before:
        if k.startswith(("patch_embed", "pos_embed", "cls_token", "blocks.0", "blocks.1.mlp")):
            np.testing.assert_array_equal(before[k], after[k])
    # AdamW keeps two moments per trained parameter, none for frozen ones.
    assert result.trainer is not None
    state = result.trainer.state
    n_trained = sum(x.size for x in jax.tree.leaves(state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_trained < 0.5 * sum(v.size for v in before.values())
    assert n_opt <= 2 * n_trained + 16


def test_accumulation_equals_one_big_batch():
    xt, yt = colour_data(32, 0)
    batch = {"image": xt, "label": yt}
    params = []
    for k in (1, 4):
        trainer = Trainer(small_config(optimizer="sgd", lr=0.1, momentum=0.9, accumulate_steps=k), trainer_vit(), steps_per_epoch=2)
        for _ in range(2):
            trainer.state = trainer.train_step(trainer.state, trainer.stage.put(batch))
        params.append(jax.device_get(trainer.state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), *params)


def test_bfloat16_trains_with_float32_master_weights():
    xt, yt = colour_data(64, 0)
    trainer = Trainer(small_config(dtype="bfloat16"), trainer_vit(dtype="bfloat16"), steps_per_epoch=10)
    losses = []
    for _i in range(10):
        trainer.state = trainer.train_step(trainer.state, trainer.stage.put({"image": xt[:32], "label": yt[:32]}))
        losses.append(trainer.read_train_metrics()["loss"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.state.opt_state) if x.dtype.kind == "f")
    assert losses[-1] < 0.8 * losses[0]


def test_eight_devices_match_one_device(cpu_devices):
    xt, yt = colour_data(96, 0)
    trajectories = []
    for devices in (cpu_devices[:1], cpu_devices):
        trainer = Trainer(small_config(optimizer="sgd", lr=0.05, momentum=0.9), trainer_vit(), steps_per_epoch=3, devices=devices)
        losses = []
        for i in range(3):
            b = {"image": xt[32 * i : 32 * i + 32], "label": yt[32 * i : 32 * i + 32]}
            trainer.state = trainer.train_step(trainer.state, trainer.stage.put(b))
            losses.append(trainer.read_train_metrics()["loss"])
        trajectories.append(losses)
        assert trainer.state.params["head"]["kernel"][...].sharding.is_fully_replicated
    np.testing.assert_allclose(trajectories[0], trajectories[1], atol=1e-5)


def test_global_batch_must_divide_by_devices(cpu_devices):
    with pytest.raises(flaxvision.FlaxvisionError, match="batch_size 12 does not divide by the 8 devices; use a multiple of 8 such as --batch-size 8"):
        Trainer(small_config(batch_size=12, eval_batch_size=16), trainer_vit(), steps_per_epoch=1, devices=cpu_devices)


class PoisonedSecondEpoch(list):
    """Batches whose second epoch carries NaN pixels (float images pass through unnormalised)."""

    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        for b in super().__iter__():
            image = b["image"].astype(np.float32)
            yield {"image": image * np.nan if self.epoch == 1 else image / 255.0, "label": b["label"]}


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    xt, yt = colour_data(256, 0)
    config = small_config(epochs=3, log_every=4)
    data = PoisonedSecondEpoch(batches(xt, yt, 32))
    with pytest.raises(TrainingDiverged, match=r"NaN or Inf at step 9; the run stopped. Last good checkpoint: .*/checkpoints/8 \(intact\)"):
        fit(config, run_dir=tmp_path, model=trainer_vit(), train_data=data)
    assert not (tmp_path / "summary.json").exists()
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [8]
    trainer = Trainer(config, trainer_vit(), steps_per_epoch=8)
    state, meta = checkpointer.restore(8, trainer.state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))
    assert meta.epoch == 1


def test_eval_covers_every_example_once_with_padding():
    xv, yv = colour_data(45, 2)
    trainer = Trainer(small_config(eval_batch_size=16), trainer_vit(), steps_per_epoch=1)
    result = trainer.evaluate(batches(xv, yv, 16))  # 16 + 16 + 13
    assert result["val_count"] == 45
    assert np.asarray(result["confusion"]).sum() == 45
    np.testing.assert_array_equal(np.asarray(result["confusion"]).sum(1), np.bincount(yv, minlength=4))
    assert 0.0 <= result["val_accuracy"] <= result["val_top5_accuracy"] == 1.0  # 4 classes: top-5 always right


# ---- optimisers and schedules ----------------------------------------------------------------------------------


def test_schedules():
    sgd = learning_rate_schedule(TrainConfig(lr=1e-3, schedule="linear"), 100)
    assert float(np.asarray(sgd(0))) == pytest.approx(1e-3) and float(np.asarray(sgd(50))) == pytest.approx(5e-4) and float(np.asarray(sgd(100))) == 0
    adamw = learning_rate_schedule(TrainConfig(optimizer="adamw", lr=3e-5, warmup_steps=500, schedule="cosine"), 2000)
    assert float(np.asarray(adamw(0))) == 0 and float(np.asarray(adamw(250))) == pytest.approx(1.5e-5) and float(np.asarray(adamw(500))) == pytest.approx(3e-5)
    assert float(np.asarray(adamw(1250))) == pytest.approx(1.5e-5, rel=1e-3) and float(np.asarray(adamw(2000))) == pytest.approx(0, abs=1e-12)


def test_weight_decay_skips_biases_norms_positions_and_cls():
    model = trainer_vit()
    mask = {".".join(map(str, k)): bool(v.get_value()) for k, v in nnx.to_flat_state(_decay_mask(nnx.state(model, nnx.Param)))}
    assert mask["blocks.0.attn.qkv.kernel"] and mask["head.kernel"] and mask["patch_embed.kernel"]
    for k in ("pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "blocks.0.norm1.scale", "norm.bias", "head.bias"):
        assert not mask[k], k


def test_layer_decay_scales_by_depth():
    model = trainer_vit()
    scales = {".".join(map(str, k)): float(v.get_value()) for k, v in nnx.to_flat_state(_layer_scales(nnx.state(model, nnx.Param), model.config, 0.5))}
    assert scales["head.kernel"] == 1.0 and scales["blocks.1.mlp.fc1.kernel"] == 0.5
    assert scales["blocks.0.attn.qkv.kernel"] == 0.25 and scales["pos_embed"] == 0.125


def test_trainable_predicates():
    cfg = trainer_vit().config
    head = trainable_predicate(TrainConfig(train_only="head"), cfg)
    assert head(("head", "kernel")) and not head(("blocks", 1, "mlp", "fc1", "kernel"))
    with pytest.raises(flaxvision.ConfigError, match="only 2 blocks"):
        trainable_predicate(TrainConfig(train_only="last:3"), cfg)
    with pytest.raises(flaxvision.ConfigError, match="not a valid regular expression"):
        trainable_predicate(TrainConfig(freeze="blocks.("), cfg)


def test_label_smoothing_loss():
    logits = jnp.asarray([[2.0, 0.0, -1.0]])
    smoothed = cross_entropy(logits, jnp.asarray([0]), 0.1)
    target = np.asarray([[1 - 0.1 + 0.1 / 3, 0.1 / 3, 0.1 / 3]])
    expected = -(target * jax.nn.log_softmax(logits)).sum()
    assert float(smoothed[0]) == pytest.approx(float(expected), rel=1e-6)
    assert float(cross_entropy(logits, jnp.asarray([0]))[0]) == pytest.approx(float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray([0]))[0]))


def test_bad_training_options():
    with pytest.raises(flaxvision.ConfigError, match="optimizer='lamb': use one of sgd, adamw"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(flaxvision.ConfigError, match="accumulate_steps=3: must divide batch_size 32"):
        TrainConfig(accumulate_steps=3)
    with pytest.raises(flaxvision.ConfigError, match="unknown training option 'learning_rate'"):
        TrainConfig().replace(learning_rate=1.0)


def test_device_out_of_memory_becomes_a_batch_size_suggestion():
    from flaxvision.train import out_of_memory_error

    config = small_config(batch_size=64)
    err = out_of_memory_error(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.2GiB"), config)
    assert isinstance(err, flaxvision.FlaxvisionError)
    assert str(err).startswith("the device ran out of memory at batch size 64; try --batch-size 32")
    assert out_of_memory_error(RuntimeError("INVALID_ARGUMENT: shapes"), config) is None


def test_fine_tune_a_transformers_checkpoint_and_ship_it_back(tmp_path):
    """pretrained= a transformers directory -> head replaced for 4 classes -> trained -> model/ loads in transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    reference = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4,
        num_labels=7))  # fmt: skip
    reference.save_pretrained(tmp_path / "ckpt")
    xt, yt = colour_data(128, 0)
    xv, yv = colour_data(32, 1)
    config = small_config(model=None, pretrained=str(tmp_path / "ckpt"), model_overrides={}, img_size=None,
                          epochs=2, report=False)  # fmt: skip
    from flaxvision.train.recipe import build_model

    model = build_model(config, num_classes=4)
    assert model.config.num_classes == 4 and not np.any(model.head.kernel[...])  # zero-initialised new head
    names = ["red", "green", "blue", "grey"]
    result = fit(config, run_dir=tmp_path / "run", model=model, train_data=batches(xt, yt, 32), val_data=batches(xv, yv, 32),
                 class_names=names)  # fmt: skip
    assert result.summary["final_val_accuracy"] > 0.5
    shipped = transformers.ViTForImageClassification.from_pretrained(tmp_path / "run" / "model").eval()
    assert shipped.config.id2label == dict(enumerate(names))
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = shipped(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
    np.testing.assert_allclose(np.asarray(result.model(jnp.asarray(x))), expected, atol=1e-4)


def test_class_count_must_match_the_model(tmp_path):
    xt, yt = colour_data(64, 0)
    with pytest.raises(flaxvision.FlaxvisionError, match="the data has 5 classes but the model predicts 4"):
        fit(small_config(), run_dir=tmp_path, model=trainer_vit(), train_data=batches(xt, yt, 32), class_names=list("abcde"))
