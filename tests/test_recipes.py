"""Training recipes on the device: the EMA of the weights and mixup / CutMix (train.ema, train.mixup).

Their SIGKILL + resume test is test_train.py's test_resume_after_sigkill_is_exact (its run has both on)."""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import flaxvision
from flaxvision.train import Trainer, fit
from flaxvision.train.ema import decay_at
from flaxvision.train.mixup import MixConfig, mix_batch
from tests.helpers import (
    CLASS_NAMES,
    batches,
    colour_data,
    metrics_records,
    run_cli,
    small_config,
    tiny_cli_config,
    tiny_vit,
)

# ---- EMA ---------------------------------------------------------------------------------------------------------


def test_ema_decay_follows_timm_model_ema_v3():
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    torch = pytest.importorskip("torch")
    for warmup in (False, True):
        reference = timm_ema.ModelEmaV3(torch.nn.Linear(1, 1), decay=0.999, use_warmup=warmup)
        for step in (1, 2, 3, 10, 100, 5000, 10**6):
            assert float(decay_at(step, 0.999, warmup)) == pytest.approx(reference.get_decay(step), rel=1e-6), (warmup, step)


def test_ema_equals_its_closed_form_on_a_toy_model():
    """After n updates, ema = sum_k w_k p_k with w_k = (1 - d_k) prod_{j > k} d_j over the raw weights p_k."""
    xt, yt = colour_data(96, 0)
    decay = 0.8
    config = small_config(ema_decay=decay, ema_warmup=True, epochs=1, optimizer="sgd", lr=0.05, momentum=0.0)
    trainer = Trainer(config, tiny_vit(), steps_per_epoch=3)
    history = []
    for batch in batches(xt, yt, 32):
        trainer.state = trainer.train_step(trainer.state, trainer.stage.put(batch))
        history.append(jax.device_get(trainer.state.params))
    d = [float(decay_at(k, decay, True)) for k in range(1, 4)]
    assert d[0] == 0.0 and 0 < d[1] < d[2] <= decay
    weights = [(1 - d[k]) * np.prod(d[k + 1:]) for k in range(3)]
    expected = jax.tree.map(lambda *p: sum(w * x for w, x in zip(weights, p, strict=True)), *history)
    got = jax.device_get(trainer.state.ema["params"])
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(history[-1]), strict=True))


def test_ema_run_writes_both_curves_both_models_and_chooses_best_by_ema(tmp_path):
    kwargs: dict[str, Any] = dict(train_data=batches(*colour_data(128, 0), 32), val_data=batches(*colour_data(32, 1), 16),
                  class_names=CLASS_NAMES)  # fmt: skip
    result = fit(small_config(ema_decay=0.5, best_by="ema", epochs=3), run_dir=tmp_path, model=tiny_vit(), **kwargs)
    evals = [r for r in metrics_records(tmp_path) if r["type"] == "eval"]
    assert len(evals) == 3 and all({"ema_val_accuracy", "ema_val_loss", "ema_val_top5_accuracy"} <= r.keys() for r in evals)
    assert result.summary["best_by"] == "ema"
    assert result.summary["best_val_accuracy"] == max(r["ema_val_accuracy"] for r in evals)
    assert result.summary["final_ema_val_accuracy"] == evals[-1]["ema_val_accuracy"]
    raw, ema = load_file(str(tmp_path / "model" / "model.safetensors")), load_file(str(tmp_path / "model_ema" / "model.safetensors"))
    assert raw.keys() == ema.keys() and any(not np.array_equal(raw[k], ema[k]) for k in raw)
    assert json.loads((tmp_path / "eval_ema.json").read_text())["val_accuracy"] == evals[-1]["ema_val_accuracy"]
    # The EMA model evaluates to what the run logged for it.
    assert result.trainer is not None
    ema_model = flaxvision.load_pretrained(tmp_path / "model_ema")
    again = flaxvision.train.Evaluator(ema_model, batch_size=16).evaluate(batches(*colour_data(32, 1), 16))
    assert again["val_loss"] == pytest.approx(evals[-1]["ema_val_loss"], rel=1e-5)


def test_export_and_predict_choose_raw_or_ema_weights(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *_tiny_cli(run), "--ema-decay", "0.5", "--epochs", "1"], capsys)
    assert code == 0, err
    for weights in ("raw", "ema"):
        code, _, err = run_cli(["export", str(run), "--weights", weights, "--format", "npz", "--out", str(tmp_path / weights)], capsys)
        assert code == 0, err
    raw, ema = np.load(tmp_path / "raw" / "model.npz"), np.load(tmp_path / "ema" / "model.npz")
    assert any(not np.array_equal(raw[k], ema[k]) for k in raw.files)
    plain = tmp_path / "plain"
    code, _, err = run_cli(["train", *_tiny_cli(plain), "--epochs", "1"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", str(plain), "--weights", "ema", "--format", "npz", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "has no model_ema/" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def _tiny_cli(run_dir) -> list[str]:
    from tests.helpers import TINY_CLI

    return [*TINY_CLI, "--run-dir", str(run_dir)]


def test_resume_refuses_a_change_of_what_checkpoints_hold(tmp_path, capsys):
    """Turning EMA on (or changing the optimizer) on resume would not restore: refused in one line, even with
    --allow-changes; the run is left as it was."""
    from tests.helpers import assert_unchanged, snapshot

    run = tmp_path / "run"
    code, _, err = run_cli(["train", *_tiny_cli(run), "--epochs", "2"], capsys)
    assert code == 0, err
    (run / "summary.json").unlink()  # as if killed before the end
    before = snapshot(run)
    for extra in (["--ema-decay", "0.9"], ["--optimizer", "sgd"], ["--model-overrides", '{"depth": 2}']):
        code, _, err = run_cli(["train", "--run-dir", str(run), "--resume", "--allow-changes", *extra], capsys)
        assert code == 2 and "--resume cannot change" in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert_unchanged(run, before)
    # A change that keeps the state's shapes is still accepted with --allow-changes.
    code, _, err = run_cli(["train", "--run-dir", str(run), "--resume", "--allow-changes", "--lr", "1e-3"], capsys)
    assert code == 0, err


def test_ema_options_are_checked():
    for kw, match in ((dict(best_by="ema"), "needs --ema-decay"), (dict(ema_decay=1.0), "must be in"),
                      (dict(ema_warmup=True), "needs --ema-decay")):  # fmt: skip
        with pytest.raises(flaxvision.FlaxvisionError, match=match):
            tiny_cli_config(**kw)


# ---- mixup / CutMix ------------------------------------------------------------------------------------------------


def _batch(n=8, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.standard_normal((n, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.permutation(n) % 5, jnp.int32)  # partner i <-> n-1-i: distinct labels (checked below)
    assert all(int(labels[i]) != int(labels[n - 1 - i]) for i in range(n))
    return images, labels


@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_targets_sum_to_one_and_carry_the_mixing_weight(mode, smoothing):
    images, labels = _batch()
    cfg = MixConfig(mixup=0.8, cutmix=1.0, mode=mode, label_smoothing=smoothing)
    for k in range(20):
        _, targets = mix_batch(images, labels, jax.random.key(k), cfg, 5, jnp.int32(0))
        np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
        assert np.all(np.asarray(targets) >= smoothing / 5 - 1e-7)


def _lam(targets, labels, i, smoothing=0.0, k=5):
    """The weight of example i's own label, read back from its soft target."""
    off = smoothing / k
    return (float(targets[i, int(labels[i])]) - off) / (1 - smoothing)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_mixup_is_the_stated_convex_combination(mode):
    images, labels = _batch()
    cfg = MixConfig(mixup=0.8, mode=mode)
    lams = []
    for k in range(5):
        mixed, targets = mix_batch(images, labels, jax.random.key(k), cfg, 5, jnp.int32(0))
        for i in range(8):
            lam = _lam(targets, labels, i)
            lams.append(lam)
            np.testing.assert_allclose(mixed[i], lam * images[i] + (1 - lam) * images[7 - i], atol=1e-5)
    per_batch = np.asarray(lams).reshape(5, 8)
    if mode == "batch":
        assert np.allclose(per_batch, per_batch[:, :1])  # one weight per batch
    else:
        assert not np.allclose(per_batch, per_batch[:, :1])


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_cutmix_pastes_one_box_whose_area_is_the_label_weight(mode):
    images, labels = _batch(size=16)
    cfg = MixConfig(cutmix=1.0, mode=mode)
    pasted_any = False
    for k in range(8):
        mixed, targets = mix_batch(images, labels, jax.random.key(k), cfg, 5, jnp.int32(0))
        for i in range(8):
            m, x, y = np.asarray(mixed[i]), np.asarray(images[i]), np.asarray(images[7 - i])
            own, other = (m == x).all(axis=-1), (m == y).all(axis=-1)
            assert np.all(own | other)  # every pixel is one of the two images'
            pasted = ~own
            if pasted.any():
                pasted_any = True
                rows, cols = np.nonzero(pasted)
                box = np.zeros_like(pasted)
                box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
                np.testing.assert_array_equal(pasted, box)  # a rectangle
            assert _lam(targets, labels, i) == pytest.approx(1 - pasted.mean(), abs=1e-6)
    assert pasted_any


def test_mixing_probability_and_off_step():
    images, labels = _batch()
    never = MixConfig(mixup=0.8, cutmix=1.0, prob=0.0)
    mixed, targets = mix_batch(images, labels, jax.random.key(0), never, 5, jnp.int32(0))
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(targets, jax.nn.one_hot(labels, 5))
    off = MixConfig(mixup=0.8, off_step=10)
    assert not np.array_equal(mix_batch(images, labels, jax.random.key(0), off, 5, jnp.int32(9))[0], images)
    np.testing.assert_array_equal(mix_batch(images, labels, jax.random.key(0), off, 5, jnp.int32(10))[0], images)
    half = MixConfig(mixup=0.8, prob=0.5, mode="elem")
    unmixed = [np.mean(np.all(np.asarray(mix_batch(images, labels, jax.random.key(k), half, 5, jnp.int32(0))[1]).max(-1, keepdims=True) == 1.0, -1))
               for k in range(40)]  # fmt: skip
    assert 0.3 < np.mean(unmixed) < 0.7


def test_mixup_trains_on_soft_targets_in_the_step(tmp_path):
    """The step's loss is the soft-target cross-entropy: with mixup on, the first step's loss differs from the
    unmixed one, and a run with mixing learns the colour task anyway."""
    kwargs: dict[str, Any] = dict(train_data=batches(*colour_data(256, 0), 32), val_data=batches(*colour_data(32, 1), 16),
                  class_names=CLASS_NAMES)  # fmt: skip
    mixed = fit(small_config(mixup=0.8, cutmix=1.0, epochs=3, log_every=1), run_dir=tmp_path / "mix", model=tiny_vit(), **kwargs)
    plain = fit(small_config(epochs=3, log_every=1), run_dir=tmp_path / "plain", model=tiny_vit(), **kwargs)
    first = lambda d: next(r for r in metrics_records(d) if r["type"] == "train")["loss"]  # noqa: E731
    assert first(tmp_path / "mix") != first(tmp_path / "plain")
    assert mixed.summary["final_val_accuracy"] > 0.6 and plain.summary["final_val_accuracy"] > 0.6


def test_mixing_keeps_every_image_on_its_device(cpu_devices):
    """Each device mixes within its own part of the batch: the compiled step moves no image between devices."""
    config = small_config(mixup=0.8, cutmix=1.0, mixup_mode="elem", batch_size=32)
    trainer = Trainer(config, tiny_vit(), steps_per_epoch=4, devices=cpu_devices)
    xt, yt = colour_data(32, 0)
    batch = trainer.stage.put({"image": xt, "label": yt})
    hlo = trainer.train_step.lower(trainer.state, batch).compile().as_text() or ""
    assert "collective-permute" not in hlo and "all-to-all" not in hlo
    images, labels = _batch(n=8)
    grouped = MixConfig(mixup=0.8, groups=2)
    mixed, targets = mix_batch(images, labels, jax.random.key(1), grouped, 5, jnp.int32(0))
    for i in range(8):  # example i of part p mixes with example (3 - i % 4) of the same part
        partner = (i // 4) * 4 + 3 - i % 4
        lam = float(targets[i, int(labels[i])]) if labels[i] != labels[partner] else None
        if lam is not None:
            np.testing.assert_allclose(mixed[i], lam * images[i] + (1 - lam) * images[partner], atol=1e-5)


@pytest.mark.parametrize("lora", [{}, {"lora_rank": 2, "lora_targets": "q,v,fc1", "lora_dropout": 0.1}],
                         ids=["full", "lora"])  # fmt: skip
def test_a_resumed_run_with_every_recipe_option_ends_equal_to_an_uninterrupted_one(tmp_path, lora):
    """EMA, mixup + CutMix per example, RandAugment, random erasing, drop-path and label smoothing, through the
    grain loader of the recipe: interrupted mid-epoch and resumed, the run ends bit-identical to one that never
    stopped (raw and EMA weights, metrics)."""
    from flaxvision.train.recipe import make_loaders
    from tests.helpers import flat_params, straight_and_interrupted

    config = small_config(
        epochs=2, batch_size=8, eval_batch_size=8, log_every=2, seed=5, ema_decay=0.8, ema_warmup=True, mixup=0.8,
        cutmix=1.0, mixup_mode="elem", randaugment="rand-m9-mstd0.5-inc1", reprob=0.5, label_smoothing=0.1,
        model_overrides={**small_config().model_overrides, "drop_path_rate": 0.1}, **lora,
    )  # fmt: skip
    straight, resumed = straight_and_interrupted(
        tmp_path, config, lambda: tiny_vit(drop_path_rate=0.1), lambda model, splits: make_loaders(config, model, splits.train, splits.val)
    )  # fmt: skip
    for weights in ("raw", "ema"):
        a, b = (flat_params(r.trainer.current_model(weights=weights)) for r in (straight, resumed))  # type: ignore[union-attr]
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{weights}: {key}")
    assert metrics_records(tmp_path / "straight") == metrics_records(tmp_path / "cut")
