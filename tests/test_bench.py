"""`flaxvision bench input` end to end, in a subprocess as a user runs it."""

import json
import subprocess
import sys

import pytest

from flaxvision.data.synthetic import write_image_folder


def flaxvision(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "flaxvision.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_image_folder(root, num_classes=2, per_split={"train": 8}, max_side=64, min_side=48)
    (root / "train" / "class_001" / "broken.jpg").write_bytes(b"")
    return root


def test_bench_input_json(tiny):
    done = flaxvision("bench", "input", "--dataset", str(tiny), "--batch-size", "4", "--batches", "3",
                      "--warmup", "1", "--img-size", "32", "--workers", "1", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert {"images_per_second", "images", "skipped", "workers"} <= set(result)
    assert result["images"] == 12 and result["workers"] == 1 and result["images_per_second"] > 0  # from the CLI
    assert result["skipped"] >= 1  # the zero-byte file, met in the first epoch of the endless stream


def test_bench_input_bad_spec_is_one_line_and_exit_2(tmp_path):
    done = flaxvision("bench", "input", "--dataset", str(tmp_path / "missing"), timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flaxvision: error: dataset") and "does not exist" in lines[0]


def test_bench_without_a_benchmark_prints_help():
    done = flaxvision("bench", timeout=120)
    assert done.returncode == 2 and "input" in done.stdout
