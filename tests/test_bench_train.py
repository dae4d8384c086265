"""`flaxvision bench train`: both sides measured in one run, the documented JSON keys."""

import json

from flaxvision import host_memory
from tests.helpers import flaxvision_cli

KEYS = {"train_images_per_second", "eval_images_per_second", "compile_seconds", "peak_memory_mb", "roofline_fraction",
        "reference_train_images_per_second", "reference_eval_images_per_second", "reference_peak_memory_mb"}  # fmt: skip


def test_bench_train_json_measures_flaxvision_and_the_reference():
    result = flaxvision_cli("bench", "train", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "4",
                            "--steps", "2", "--warmup", "1", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert KEYS <= set(out)
    for key in KEYS:
        assert out[key] is not None and out[key] > 0, key  # transformers is installed in the test environment
    assert out["roofline_fraction"] < 1.5 and out["roofline_gflops"] > 1
    assert out["model"] == "vit_tiny_patch16_224" and out["batch_size"] == 4
    assert out["first_step_seconds"] >= out["compile_seconds"] > 0
    assert out["remat"] == "dots"  # the ViT default
    # The CLI re-ran itself with glibc's huge-page tunable where the system has it (the test's environment has not).
    assert out["huge_pages"] == (host_memory.environment({}) is not None)


def test_bench_train_unknown_model():
    result = flaxvision_cli("bench", "train", "--model", "vit_hugе_patch14", "--no-reference")
    assert result.returncode == 2 and "unknown model" in result.stderr
