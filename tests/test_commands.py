"""The user's commands end to end in subprocesses: the offline default run, then evaluate, predict, export, report."""

import html.parser
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers import flaxvision_cli


def cli(*args, env_extra=None, timeout=600):
    if env_extra:
        old = {k: os.environ.get(k) for k in env_extra}
        os.environ.update(env_extra)
        try:
            return flaxvision_cli(*args, timeout=timeout)
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return flaxvision_cli(*args, timeout=timeout)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("flaxvision-cache"))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cache_dir):
    """`flaxvision train` with no arguments but a run directory: the README's command (a)."""
    run_dir = tmp_path_factory.mktemp("runs") / "default"
    result = cli("train", "--run-dir", str(run_dir), "--no-progress", env_extra={"FLAXVISION_CACHE": cache_dir})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    width, height = struct.unpack(">II", data[16:24])
    with Image.open(path) as image:
        image.verify()
    return width > 50 and height > 50


class ImageSources(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.files, self.data_uris = [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.files.append(attrs.get("data-file"))
            self.data_uris += (attrs.get("src") or "").startswith("data:image/png;base64,")


def test_default_run_trains_offline_to_95_percent_with_the_full_run_directory(default_run):
    run_dir, result = default_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_accuracy"] >= 0.95, summary
    assert summary["epochs"] == 20 and summary["steps"] > 0
    for name in ("config.json", "metrics.jsonl", "eval.json", "skipped_images.json", "report.html"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "model" / "config.json").is_file()
    assert "val top-1" in result.stdout
    # Every plot is a valid PNG, and report.html embeds each of them (no network needed to open it).
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    assert pngs == sorted(["lr_schedule.png", "train_loss.png", "val_curves.png", "train_samples.png", "val_samples.png",
                           "predictions.png", "confusion_matrix.png", "reliability.png", "mistakes.png",
                           "explanations.png"])  # fmt: skip
    assert all(is_png(run_dir / p) for p in pngs)
    parser = ImageSources()
    parser.feed((run_dir / "report.html").read_text())
    assert sorted(parser.files) == pngs and parser.data_uris == len(pngs)
    assert "http://" not in (run_dir / "report.html").read_text() and "https://" not in (run_dir / "report.html").read_text()


def test_evaluate_json(default_run):
    run_dir, _ = default_run
    result = cli("evaluate", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"accuracy", "top5_accuracy", "loss", "per_class"} <= set(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert out["accuracy"] == pytest.approx(summary["final_val_accuracy"], abs=1e-9)  # the same held-out images
    assert set(out["per_class"]) == {str(i) for i in range(10)}
    assert np.asarray(out["confusion_matrix"]).sum() == out["count"] == 359


def test_predict_images_and_a_broken_file(default_run, tmp_path):
    from sklearn.datasets import load_digits

    run_dir, _ = default_run
    digits: Any = load_digits()  # a Bunch (the stubs also allow the return_X_y tuple)
    for i in range(6):
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(tmp_path / f"d{i}_{digits.target[i]}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    result = cli("predict", str(run_dir), str(tmp_path), "--top-k", "3", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 7
    broken = next(r for r in rows if r["path"].endswith("broken.png"))
    assert "unreadable" in broken["error"] and "broken.png" in result.stderr
    good = [r for r in rows if "predictions" in r]
    for r in good:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    right = sum(r["predictions"][0]["label"] == Path(r["path"]).stem.split("_")[1] for r in good)
    assert right >= 5
    table = cli("predict", str(run_dir / "model"), str(tmp_path / "d0_0.png"))
    assert table.returncode == 0 and table.stdout.startswith(str(tmp_path / "d0_0.png") + ": 0 ")


def test_export_to_transformers_timm_and_npz(default_run, tmp_path):
    run_dir, _ = default_run
    for fmt in ("transformers", "timm", "npz"):
        result = cli("export", str(run_dir), "--format", fmt, "--out", str(tmp_path / fmt))
        assert result.returncode == 0, result.stderr
        assert any((tmp_path / fmt).iterdir())
    config = json.loads((tmp_path / "transformers" / "config.json").read_text())
    assert config["id2label"]["3"] == "3" and len(config["id2label"]) == 10 and config["image_size"] == 16


def test_report_regenerates_the_pictures(default_run):
    run_dir, _ = default_run
    (run_dir / "predictions.png").unlink()
    (run_dir / "report.html").unlink()
    result = cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert is_png(run_dir / "predictions.png") and (run_dir / "report.html").is_file()


def test_resuming_a_finished_run_changes_nothing_and_new_runs_refuse_its_directory(default_run, cache_dir):
    run_dir, _ = default_run
    refused = cli("train", "--run-dir", str(run_dir), env_extra={"FLAXVISION_CACHE": cache_dir})
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("already holds a run; pass --resume to continue it or --overwrite to replace it")


@pytest.mark.parametrize(
    "args, message",
    [
        (("train", "--model", "vit_bse_patch16_224"), "unknown model 'vit_bse_patch16_224' (did you mean vit_base_patch16_224"),
        (("train", "--dataset", "./no/such/dir"), "dataset './no/such/dir' does not exist"),
        (("train", "--dataset", "builtin:digitz"), "unknown built-in dataset 'builtin:digitz' (did you mean digits?)"),
        (("train", "--lr", "-1"), "lr=-1.0: must be > 0"),
        (("train", "--resume"), "--resume needs --run-dir"),
        (("evaluate", "/no/such/run"), "is not a run directory"),
        (("report", "/tmp"), "is not a flaxvision run directory (no metrics.jsonl)"),
        (("train", "--val-split", "holdout"), "has no split 'holdout'"),
        (("train", "--model", "cnn", "--pretrained", "/no/such/checkpoint"), "/no/such/checkpoint"),
        (("train", "--dataset", "ethz/food101", "--model", "cnn"), "is not in the local cache and offline mode is on"),
        (("train", "--preset", "food101-vit-b16-sgd"), "is not in the local cache and offline mode is on"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(args, message, tmp_path, cache_dir, capsys, monkeypatch):
    # In-process through cli.main (what the console script calls); the subprocess path is covered above.
    from flaxvision import cli as flaxvision_main

    monkeypatch.setenv("FLAXVISION_CACHE", cache_dir)
    if args[0] == "train" and "--resume" not in args:
        args = (*args, "--run-dir", str(tmp_path / "r"))
    assert flaxvision_main.main(list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flaxvision: error: ") and message in lines[0], lines


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, cache_dir):
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "interrupted"
    args = ["train", "--run-dir", str(run_dir), "--epochs", "2", "--log-every", "2", "--no-progress", "--no-report"]
    exe = Path(sys.executable).parent / "flaxvision"
    env = {**os.environ, "FLAXVISION_CACHE": cache_dir, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"train"') >= 2:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith("flaxvision: error: interrupted at step ") and f"--run-dir {run_dir} --resume" in message
    step = int(message.split("interrupted at step ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / str(step)).is_dir(), (message, sorted(p.name for p in (run_dir / "checkpoints").iterdir()), err[-3000:])
    resumed = cli(*args, "--resume", env_extra={"FLAXVISION_CACHE": cache_dir})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {step}" in resumed.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 44  # 2 epochs of 22 steps, none repeated


def test_evaluate_with_data_of_other_classes_is_a_clear_error(default_run, tmp_path):
    from flaxvision.data.synthetic import write_image_folder

    run_dir, _ = default_run
    root = write_image_folder(tmp_path / "four", num_classes=4, per_split={"validation": 2}, max_side=24, min_side=16)
    result = cli("evaluate", str(run_dir), "--dataset", str(root), "--split", "validation")
    assert result.returncode == 2
    assert result.stderr.strip() == (  # classes are matched by name: none of these is one of the model's
        f"flaxvision: error: {str(root)!r} has classes the model does not know: 'class_000', 'class_001', "
        "'class_002', 'class_003' (the model's 10 classes: 0, 1, 2, 3, 4, ...); evaluate on data of the model's "
        "classes, or pass --match-classes index to pair classes by position"
    )
    by_position = cli("evaluate", str(run_dir), "--dataset", str(root), "--split", "validation", "--match-classes", "index")
    assert by_position.returncode == 2 and "the model predicts 10 classes but" in by_position.stderr
