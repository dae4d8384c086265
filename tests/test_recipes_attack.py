"""Hostile tests of the training recipes (issue 14): EMA, mixup/CutMix, LoRA adapters, resume safety.

Each test is a bug found by attacking the features as a timm / PEFT user would (or a guard of a fix)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxvision.train.mixup import MixConfig, mix_batch
from tests.helpers import (
    colour_fit_kwargs,
    error_lines,
    metrics_records,
    run_cli,
    small_config,
    stop_after_first_epoch,
    tiny_vit,
)


@pytest.mark.parametrize("alphas", [(0.0, 1.0), (0.8, 1.0)])
def test_cutmix_batch_mode_pastes_one_box_for_the_whole_batch(alphas):
    """mix_batch's docstring and timm's Mixup(mode="batch"): one lam and ONE box per batch. It drew one box per
    example (cutmix_boxes got the broadcast lam, so every example drew its own centre and its own clipped lam)."""
    mixup, cutmix = alphas
    images = jnp.arange(8, dtype=jnp.float32)[:, None, None, None] * jnp.ones((8, 16, 16, 1))
    labels = jnp.arange(8)  # partners (i, 7 - i) have distinct labels
    cfg = MixConfig(mixup=mixup, cutmix=cutmix, mode="batch")
    boxes_seen = 0
    for k in range(12):
        mixed, targets = mix_batch(images, labels, jax.random.key(k), cfg, 8, jnp.int32(0))
        pasted = np.asarray(mixed[..., 0]) != np.arange(8)[:, None, None]
        blended = np.all(pasted, axis=(1, 2)) & ~np.isin(np.asarray(mixed[:, 0, 0, 0]), np.arange(8))
        if blended.any():  # a mixup batch (every pixel a blend): not a CutMix one
            continue
        boxes_seen += 1
        for i in range(1, 8):
            np.testing.assert_array_equal(pasted[i], pasted[0], err_msg=f"key {k}: example {i} got another box")
        own = np.asarray(targets)[np.arange(8), np.asarray(labels)]
        np.testing.assert_allclose(own, own[0], err_msg=f"key {k}: one lam per batch")
    assert boxes_seen


def test_resume_with_another_best_by_keeps_the_best_consistent(tmp_path):
    """--best-by raw -> ema on --resume --allow-changes: summary.json said best_by "ema" with a best_val_accuracy
    (and best_step, and the kept best checkpoint) of the RAW weights from before the resume: a number no EMA
    evaluation ever reached. Either refuse the change or choose the best by the EMA over the whole run."""
    import flaxvision
    from flaxvision.train import fit

    run = tmp_path / "run"
    config = small_config(ema_decay=0.99, best_by="raw", epochs=2)  # the EMA lags far behind the raw weights
    with pytest.raises(flaxvision.train.TrainingInterrupted):
        fit(config, run_dir=run, on_epoch_end=stop_after_first_epoch, **colour_fit_kwargs())
    try:
        result = fit(config.replace(best_by="ema"), run_dir=run, resume=True, allow_changes=True, **colour_fit_kwargs())
    except flaxvision.FlaxvisionError as err:  # refusing is fine too
        assert "best_by" in str(err) and "\n" not in str(err)
        return
    evals = [r for r in metrics_records(run) if r["type"] == "eval"]
    best = max(r["ema_val_accuracy"] for r in evals)
    assert result.summary["best_by"] == "ema"
    assert result.summary["best_val_accuracy"] == best, (result.summary, evals)
    assert result.summary["best_step"] in [r["step"] for r in evals if r["ema_val_accuracy"] == best]


def _adapter(tmp_path, base):
    """An adapter directory written by save_adapter for a tiny ViT with LoRA, recorded as trained on `base`."""
    from flaxvision.models.lora import apply_lora
    from flaxvision.weights import save_adapter

    model = apply_lora(tiny_vit(), rank=2)
    return save_adapter(model, tmp_path / "adapter", base=base)


def test_a_from_scratch_adapter_error_says_what_to_do_on_the_command_line(tmp_path, capsys):
    """A LoRA run without --pretrained writes adapter/ with base "none"; predict/evaluate/export of it said
    "pass base= (the model it was trained on)": a Python keyword, there is no such CLI option. The line must say
    something the command line can do (e.g. use the run's merged model/)."""
    adapter = _adapter(tmp_path, None)
    out = tmp_path / "out"
    code, _, err = run_cli(["export", str(adapter), "--merge-lora", "--format", "npz", "--out", str(out)], capsys)
    assert code == 2 and len(error_lines(err)) == 1, err
    assert "base=" not in err, err
    assert not out.exists()


def test_an_adapter_whose_base_is_gone_names_the_adapter_and_its_base(tmp_path, capsys):
    """An adapter dir whose recorded base path no longer exists: the error only said "no such file or directory:
    '<base>'; pass a Hugging Face Hub repo id ...", not that this is the base the ADAPTER names (in its
    adapter_config.json), to a user who passed the adapter dir."""
    gone = tmp_path / "base-run" / "model"
    adapter = _adapter(tmp_path, gone)
    info = json.loads((adapter / "adapter_config.json").read_text())
    assert info["base_model"] == str(gone)
    out = tmp_path / "out"
    code, _, err = run_cli(["export", str(adapter), "--merge-lora", "--format", "npz", "--out", str(out)], capsys)
    assert code == 2 and len(error_lines(err)) == 1, err
    line = err.replace(str(tmp_path), "<tmp>")  # (the test's own directory name says "adapter")
    assert "<tmp>/base-run/model" in line and "adapter" in line.lower(), err
    assert not out.exists()


def test_resume_reads_lora_targets_in_any_order_as_the_same(tmp_path):
    """--lora-targets v,q,fc1 on resume of a q,v,fc1 run was refused even with --allow-changes ("the checkpoints
    hold a state without it"), though the adapters are the same (targets are kept in canonical order)."""
    from flaxvision.train.rundir import RunDirectory

    saved = small_config(lora_rank=2, lora_targets="q,v,fc1")
    (tmp_path / "config.json").write_text(json.dumps({"train_config": saved.to_dict()}))
    run = RunDirectory(tmp_path)
    assert run.check_changes(saved.replace(lora_targets="v,q,fc1"), allow=False) == {}
    changes = run.check_changes(saved.replace(lora_targets="fc1,v,q", lora_alpha=4.0), allow=True)
    assert changes == {"lora_alpha": [None, 4.0]}
    with pytest.raises(Exception, match="cannot change lora_targets"):
        run.check_changes(saved.replace(lora_targets="q,v"), allow=True)
