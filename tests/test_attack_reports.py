"""Hostile input to the report and the compare page: damaged run files, class and run names that matplotlib would
read as TeX or as "no legend", each met with one line (exit 2) or drawn as written, never a traceback."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.helpers import assert_unchanged, error_lines, run_cli, snapshot

TRAIN = {"type": "train", "step": 2, "epoch": 1, "loss": 1.3, "accuracy": 0.3, "lr": 1e-3}
EVAL = {"type": "eval", "step": 4, "epoch": 1, "val_loss": 1.2, "val_accuracy": 0.5, "val_top5_accuracy": 1.0}


def fake_run(path, lines=None, lr=1e-3, **files):
    """A finished run directory as `flaxvision train` leaves it, as far as the pages read one (no model)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"train_config": {"lr": lr, "epochs": 1}, "steps_per_epoch": 4}))
    lines = [json.dumps(TRAIN), json.dumps(EVAL)] if lines is None else lines
    (path / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))
    (path / "summary.json").write_text(json.dumps({"final_val_accuracy": 0.5, "steps": 4}))
    for name, text in files.items():
        (path / name.replace("_", ".")).write_text(text)
    return path


DAMAGED = {  # metrics.jsonl lines, what the one line says
    "eval without val_loss": ([json.dumps(TRAIN), json.dumps({**EVAL, "val_loss": None})], "has val_loss None"),
    "train without loss": ([json.dumps({k: v for k, v in TRAIN.items() if k != "loss"})], "has loss None"),
    "step a string": ([json.dumps({**TRAIN, "step": "2"})], "has step '2', not a number"),
    "not an object": ([json.dumps(TRAIN), "[1, 2]"], "record 2 of"),
    "no type": (["{}"], "not a metrics record"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_compare_names_a_damaged_metrics_record_in_one_line_and_writes_nothing(tmp_path, capsys, case):
    lines, message = DAMAGED[case]
    good, bad = fake_run(tmp_path / "good"), fake_run(tmp_path / "bad", lines, lr=1e-4)
    before = snapshot(tmp_path)
    code, _, err = run_cli(["compare", good, bad, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and message in err and "bad/metrics.jsonl" in err, err
    assert_unchanged(tmp_path, before)


@pytest.mark.parametrize("case", ["summary a list", "steps_per_epoch a string", "metrics not UTF-8"])
def test_compare_refuses_other_damaged_run_files_in_one_line(tmp_path, capsys, case):
    good, bad = fake_run(tmp_path / "good"), fake_run(tmp_path / "bad", lr=1e-4)
    if case == "summary a list":
        (bad / "summary.json").write_text("[1]")
        message = "summary.json holds list [1], not a JSON object"
    elif case == "steps_per_epoch a string":
        (bad / "config.json").write_text(json.dumps({"train_config": {}, "steps_per_epoch": "x"}))
        message = "has steps_per_epoch 'x', not a whole number"
    else:
        (bad / "metrics.jsonl").write_bytes(b"\xff\xfe\n")
        message = "cannot read"
    before = snapshot(tmp_path)
    code, _, err = run_cli(["compare", good, bad, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and message in err, err
    assert_unchanged(tmp_path, before)


@pytest.mark.parametrize("case", ["no type", "eval without val_loss", "summary a list", "eval a list"])
def test_report_names_a_damaged_run_file_in_one_error_and_leaves_the_report_alone(tmp_path, case):
    from flaxvision.errors import FlaxvisionError
    from flaxvision.report import write_report

    if case in DAMAGED:
        run, message = fake_run(tmp_path / "run", DAMAGED[case][0]), DAMAGED[case][1]
    else:
        name, message = ("summary.json", "summary.json holds list") if case == "summary a list" else ("eval.json", "eval.json holds list")
        run = fake_run(tmp_path / "run")
        (run / name).write_text("[1]")
    before = snapshot(run)
    with pytest.raises(FlaxvisionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        write_report(run)
    assert_unchanged(run, before)


def test_plots_draw_class_names_with_dollar_signs_as_written(tmp_path):
    """A class folder named "$\\frac{1$" made every grid and the confusion matrix raise ValueError from matplotlib's
    TeX parser: at the end of training, before summary.json was written."""
    from flaxvision.report import plots

    names = ["$\\frac{1$", "<b>x</b>", "US$ 5 to $10", "café"]
    images = np.zeros((4, 8, 8, 3), np.uint8)
    made = [plots.image_grid(images, names, "t", tmp_path / "g.png"),
            plots.prediction_grid(images, names, names[::-1], [0.5] * 4, tmp_path / "p.png"),
            plots.confusion_matrix(np.eye(4, dtype=int), names, tmp_path / "c.png")]  # fmt: skip
    assert all(p.stat().st_size > 1000 for p in made)


def test_compare_legend_keeps_a_run_whose_name_starts_with_an_underscore(tmp_path):
    """matplotlib leaves labels that start with "_" out of a legend: a run named "_baseline" was missing from every
    curve's legend, with only a warning ("No artists with labels found") to say so."""
    from flaxvision.report import plots

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.overlaid([("_baseline", [0, 1], [1.0, 0.5])], "epoch", "loss", "Training loss", tmp_path / "o.png")


def test_compare_page_escapes_run_names(tmp_path, capsys):
    a, b = fake_run(tmp_path / "<script>a"), fake_run(tmp_path / "$\\frac{1$", lr=1e-4)
    code, _, err = run_cli(["compare", a, b, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    text = (tmp_path / "out" / "compare.html").read_text()
    assert "<script>" not in text and "&lt;script&gt;a" in text
