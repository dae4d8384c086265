"""benchmarks/gpu_check.py's guards: a part that fails, hangs or comes too late is recorded and the run goes on.

The script itself runs on a GPU machine (its tiny mode, `GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh`, takes
minutes on the test machine: too slow for the suite); these tests cover what decides whether a run there still
prints its JSON: the child runner and the per-part guard, with stand-in parts that take no time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
assert _spec is not None and _spec.loader is not None
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # (its dataclass looks its module up while being defined)
_spec.loader.exec_module(gpu_check)


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (killed, not yet reaped by whoever adopted it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_child_that_hangs_is_killed_with_its_children_and_what_it_printed_is_kept():
    code = (
        "import json, subprocess, sys, time\n"
        "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(json.dumps({'mode': 'eager', 'helper': helper.pid}), flush=True)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    objects, error = gpu_check._run(["-c", code], timeout=3)
    assert time.monotonic() - start < 20
    assert error == "timed out after 3 s"
    assert objects[0]["mode"] == "eager"
    deadline = time.monotonic() + 5
    while not _gone(objects[0]["helper"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(objects[0]["helper"]), "the child's own child outlived the timeout"


def test_a_failing_child_gives_its_last_error_line():
    objects, error = gpu_check._run(["-c", "print('{\"a\": 1}'); raise SystemExit('no CUDA device')"], timeout=30)
    assert objects == [{"a": 1}]
    assert error == "exit 1: no CUDA device"


@pytest.fixture
def run():
    plan = dataclasses.replace(gpu_check.TINY, total_seconds=100, input_seconds=20)
    return gpu_check.Run(plan)


def test_guard_records_an_error_and_the_time_and_skips_parts_past_the_deadline(run):
    def broken(timeout):
        raise RuntimeError("exit 1: Traceback ...\nXlaRuntimeError: RESOURCE_EXHAUSTED: out of memory")

    out = run.guarded("broken", 30, broken)
    assert out["error"] == "RuntimeError: XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory"
    assert out["wall_seconds"] >= 0
    seen = []
    assert run.guarded("fine", 30, lambda timeout: seen.append(timeout) or {"x": 1})["x"] == 1
    assert 0 < seen[0] <= 30  # the part's own limit, under what is left

    run.deadline = time.monotonic() + 5  # less than a part needs is left
    assert run.guarded("late", 30, lambda timeout: {"x": 1})["error"].startswith("skipped:")


def test_summary_gives_mfu_and_ratios_and_stays_valid_json_with_missing_parts(run):
    run.result["device"] = {"peak_bf16_flops": 1e12}
    run.result["train"] = {
        "m_b8": {"flaxvision": {"train_images_per_second": 100.0, "forward_gflops": 2.0},
                 "torch_eager": {"train_images_per_second": 50.0}, "torch_compile": {"error": "timed out after 9 s"}},
        "m_b16": {"flaxvision": {"error": "skipped: 3 s of the time budget left"}},
    }  # fmt: skip
    run.summarise()
    ok, failed = run.result["train"]["m_b8"], run.result["train"]["m_b16"]
    assert ok["mfu"] == pytest.approx(3 * 2e9 * 100 / 1e12)  # TRAIN_FLOPS_FACTOR x forward FLOPs x images/s
    assert ok["ratio_vs_torch_eager"] == pytest.approx(2.0) and ok["ratio_vs_torch_compile"] is None
    assert "mfu" not in failed and failed["ratio_vs_torch_eager"] is None
    assert json.loads(json.dumps(run.result))["wall_seconds"] >= 0


def test_peak_table_matches_device_kinds_most_specific_first():
    peak = gpu_check.peak_bf16_flops
    assert peak("NVIDIA H100 80GB HBM3") == 989e12 and peak("NVIDIA H100 PCIe") == 756e12
    assert peak("NVIDIA H200") == 989e12 and peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak("TPU v5 lite") == 197e12 and peak("TPU v5p") == 459e12
    assert peak("cpu") is None  # then the measured matmul
