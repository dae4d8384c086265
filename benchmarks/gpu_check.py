"""One check of flaxvision on a CUDA machine, in under 8 minutes: train images/s, MFU, the PyTorch ratio, input.

    bash benchmarks/gpu_check.sh                       # on the GPU machine, from the root of a copy of the repo
    GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh      # tiny sizes, any machine (2 CPU cores: about 2 minutes)
    bash benchmarks/gpu_check.sh --only torch,input --models resnet50    # a second run for what the first missed

Prints ONE JSON object on stdout (progress goes to stderr):
  device          JAX's device kind, the measured bf16 matmul rate, and the peak bf16 FLOP/s that MFU divides by
                  (a table of data-sheet dense peaks by device kind; else the measured matmul)
  train           per "<model>_b<batch>": the flaxvision side of `flaxvision bench train` (bfloat16 compute,
                  float32 master weights, SGD with momentum: flaxvision.train.benchmark) with its MFU, the same
                  model in timm (PyTorch) under torch AMP bf16, eager and torch.compile'd, same batch, same
                  optimizer, and the ratios flaxvision / torch
  input_pipeline  `flaxvision bench input` with a worker per host core on generated JPEGs, or a "skipped: ..."
                  string when grain is not importable (carry its wheels: see gpu_check.sh)
Each part runs in a fresh process under its own time limit and the whole run under one deadline; a part that
fails or runs out of time is recorded as {"error": "..."} and the rest goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Data-sheet dense bf16 peaks (no sparsity) by a piece of JAX's device_kind, the first match wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v6", 918e12),
)  # fmt: skip


def peak_bf16_flops(device_kind: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in device_kind), None)


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str  # "full" or "tiny"
    setups: tuple[tuple[str, tuple[int, ...]], ...]  # (model, batch sizes); the same batches on both sides
    img_size: int
    steps: int  # timed steps per measurement
    warmup: int  # untimed steps after the first
    matmul_n: int  # side of the square bf16 matmul that measures the device
    total_seconds: float  # deadline of the whole run
    part_seconds: float  # limit of one part (the first flaxvision part gets 1.5x: a cold start)
    input_seconds: float  # kept for the input pipeline at the end
    jpegs_per_class: int  # generated images: 16 classes
    input_batch: int
    input_batches: int
    compile_backend: str = "inductor"  # torch.compile's; tiny mode: "eager" (graph capture only, no code generation)


FULL = Plan(
    name="full", setups=(("vit_base_patch16_224", (128, 256)), ("vit_tiny_patch16_224", (128,)), ("resnet50", (128,))),
    img_size=224, steps=20, warmup=3, matmul_n=8192, total_seconds=450, part_seconds=150, input_seconds=60,
    jpegs_per_class=48, input_batch=128, input_batches=30,
)  # fmt: skip
TINY = Plan(
    name="tiny", setups=(("vit_tiny_patch16_224", (4, 8)), ("resnet18", (4,))),
    img_size=32, steps=2, warmup=1, matmul_n=512, total_seconds=180, part_seconds=60, input_seconds=40,
    jpegs_per_class=4, input_batch=8, input_batches=4, compile_backend="eager",
)  # fmt: skip
PARTS = frozenset({"flaxvision", "torch", "input"})
MIN_PART_SECONDS = 10  # a part is skipped when less than this is left


def log(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def _last_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[-limit:]


def _run(args: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Run `python ARGS` in its own process group; return the JSON objects it printed (one per line, or the whole
    output as one) and an error (None when it succeeded). On timeout the whole group is killed."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
        error = None if proc.returncode == 0 else f"exit {proc.returncode}: {_last_line(err)}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torch.compile's worker processes too
        out, err = proc.communicate()
        error = f"timed out after {timeout:.0f} s"
    try:
        objects = [json.loads(out)]
    except json.JSONDecodeError:
        objects = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return objects, error


# ---- child parts (run as `python benchmarks/gpu_check.py --part NAME ...`) ----------------------------------------


def part_device(matmul_n: int) -> None:
    import jax

    from flaxvision.train.benchmark import matmul_roofline

    device = jax.devices()[0]
    kind = device.device_kind
    measured = matmul_roofline(matmul_n, repeats=10, dtype="bfloat16") * 1e9
    table = peak_bf16_flops(kind)
    print(json.dumps({
        "platform": device.platform, "device_kind": kind, "device_count": jax.device_count(),
        "jax_version": jax.__version__, "matmul_bf16_flops": measured, "matmul_n": matmul_n,
        "peak_bf16_flops": table or measured, "peak_source": "table" if table else "measured matmul",
        "host_cores": os.cpu_count(),
    }))  # fmt: skip


def _time_torch(model: str, mode: str, batch: int, img_size: int, steps: int, warmup: int, backend: str) -> dict:
    import timm
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    vit = model.startswith("vit")
    torch.manual_seed(0)
    options: dict[str, Any] = {"img_size": img_size} if vit else {}
    net = timm.create_model(model, pretrained=False, num_classes=1000, **options)
    layout = torch.contiguous_format if vit else torch.channels_last  # convolutions: NHWC under AMP
    net = net.to(device).train()
    if not vit:
        net = net.to(memory_format=layout)  # pyright: ignore[reportCallIssue]  a keyword torch's stubs omit
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=layout)
    labels = torch.arange(batch, device=device) % 1000
    forward = torch.compile(net, dynamic=False, backend=backend) if mode == "compile" else net

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return {
        "mode": mode, "batch_size": batch, "train_images_per_second": steps * batch / (time.perf_counter() - start),
        "first_step_seconds": first, "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "layout": "NCHW" if vit else "channels_last", "torch_version": torch.__version__,
        "timm_version": timm.__version__, **({"compile_backend": backend} if mode == "compile" else {}),
    }  # fmt: skip


def part_torch(model: str, batches: list[int], img_size: int, steps: int, warmup: int, backend: str) -> None:
    """timm's `model` under torch AMP bf16, eager then torch.compile'd, one JSON line per (mode, batch) as it goes.

    Each measurement builds the model afresh (the same seed); compiled ones with dynamic=False, so that a second
    batch size compiles its own static graph instead of one with a symbolic batch."""
    import torch

    torch.backends.cudnn.benchmark = True
    for mode in ("eager", "compile"):
        for batch in batches:
            print(json.dumps(_time_torch(model, mode, batch, img_size, steps, warmup, backend)), flush=True)


def part_jpegs(root: str, per_class: int) -> None:
    from flaxvision.data.synthetic import write_image_folder

    write_image_folder(root, num_classes=16, per_split={"train": per_class, "validation": 1}, seed=0)
    print(json.dumps({"root": root, "images": 16 * per_class}))


# ---- the orchestrator (never starts a jax backend nor imports torch: each part has the accelerator to itself) ----


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Run:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.start = time.monotonic()
        self.grain = _importable("grain")
        self.deadline = self.start + plan.total_seconds
        self.result: dict[str, Any] = {
            "mode": plan.name, "plan": dataclasses.asdict(plan),
            "device": None, "train": {}, "input_pipeline": None,
        }  # fmt: skip

    def left(self, reserve: float = 0.0) -> float:
        return self.deadline - reserve - time.monotonic()

    def guarded(self, label: str, budget: float, part, *, last: bool = False) -> dict[str, Any]:
        """`part(timeout)` under min(budget, time left); its dict, or {"error": ...}; with its wall time."""
        reserve = 0.0 if last or not self.grain else self.plan.input_seconds
        left = self.left(reserve)
        if left < MIN_PART_SECONDS:
            log(f"{label}: skipped, {max(left, 0):.0f} s left")
            return {"error": f"skipped: {max(left, 0):.0f} s of the time budget left"}
        timeout = min(budget, left)
        log(f"{label}: up to {timeout:.0f} s")
        start = time.monotonic()
        out: dict[str, Any]
        try:
            out = part(timeout)
        except subprocess.TimeoutExpired:
            out = {"error": f"timed out after {timeout:.0f} s"}
        except Exception as err:  # recorded, and the run goes on
            out = {"error": f"{type(err).__name__}: {_last_line(str(err))}"}
        out["wall_seconds"] = round(time.monotonic() - start, 1)
        log(f"{label}: {'error: ' + out['error'] if 'error' in out else 'done'} in {out['wall_seconds']} s")
        return out

    def _child(self, *args: str, timeout: float, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
        objects, error = _run([__file__, *args], timeout, env)
        if error:
            raise RuntimeError(error)
        return objects

    def device(self) -> None:
        self.result["device"] = self.guarded(
            "device", self.plan.part_seconds,
            lambda t: self._child("--part", "device", "--matmul-n", str(self.plan.matmul_n), timeout=t)[0],
        )  # fmt: skip

    def flaxvision(self, model: str, batch: int, budget: float) -> None:
        from flaxvision.train.benchmark import _child as benchmark_side

        p = self.plan

        def part(timeout: float) -> dict[str, Any]:
            out = benchmark_side("flaxvision", timeout=timeout, model=model, batch_size=batch, img_size=p.img_size,
                                 dtype="bfloat16", steps=p.steps, warmup=p.warmup)  # fmt: skip
            if out is None:
                raise RuntimeError("the flaxvision side could not run: a module is missing")
            return out

        setup = self.result["train"].setdefault(f"{model}_b{batch}", {"model": model, "batch_size": batch})
        setup["flaxvision"] = self.guarded(f"flaxvision {model} b{batch}", budget, part)

    def torch(self, model: str, batches: tuple[int, ...]) -> None:
        p = self.plan
        args = ["--part", "torch", "--model", model, "--batches", ",".join(map(str, batches)),
                "--img-size", str(p.img_size), "--steps", str(p.steps), "--warmup", str(p.warmup),
                "--compile-backend", p.compile_backend]  # fmt: skip
        found: list[dict[str, Any]] = []

        def part(timeout: float) -> dict[str, Any]:
            objects, error = _run([__file__, *args], timeout)
            found.extend(objects)
            return {"error": error} if error else {}

        outcome = self.guarded(f"timm {model} b{'/'.join(map(str, batches))}", p.part_seconds, part)
        for batch in batches:
            setup = self.result["train"].setdefault(f"{model}_b{batch}", {"model": model, "batch_size": batch})
            for mode in ("eager", "compile"):
                hit = [o for o in found if o["mode"] == mode and o["batch_size"] == batch]
                # What the child measured survives its failure; what it did not reach carries the error.
                setup[f"torch_{mode}"] = hit[0] if hit else {"error": outcome.get("error", "not measured")}

    def input_pipeline(self) -> None:
        if not self.grain:
            self.result["input_pipeline"] = "skipped: grain not installed"
            return
        p = self.plan

        def part(timeout: float) -> dict[str, Any]:
            with tempfile.TemporaryDirectory(prefix="gpu_check_jpegs_") as root:
                start = time.monotonic()
                self._child("--part", "jpegs", "--root", root, "--per-class", str(p.jpegs_per_class), timeout=timeout)
                workers = os.cpu_count() or 1
                args = ["-m", "flaxvision", "bench", "input", "--dataset", root, "--workers", str(workers),
                        "--batch-size", str(p.input_batch), "--batches", str(p.input_batches), "--img-size",
                        str(p.img_size), "--json"]  # fmt: skip
                # The workers only decode; no process of this part needs the accelerator's memory up front.
                env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
                objects, error = _run(args, timeout - (time.monotonic() - start), env)
                if error:
                    raise RuntimeError(error)
                return objects[0]

        self.result["input_pipeline"] = self.guarded("input pipeline", p.input_seconds, part, last=True)

    def summarise(self) -> None:
        """MFU of each flaxvision measurement, and the flaxvision / torch ratios."""
        from flaxvision.train.benchmark import TRAIN_FLOPS_FACTOR

        device: dict[str, Any] = self.result["device"] or {}
        peak = device.get("peak_bf16_flops")
        for setup in self.result["train"].values():
            ours = setup.get("flaxvision", {}).get("train_images_per_second")
            if ours and peak:
                flops = TRAIN_FLOPS_FACTOR * setup["flaxvision"]["forward_gflops"] * 1e9 * ours
                setup["mfu"] = flops / peak
            for mode in ("eager", "compile"):
                theirs = setup.get(f"torch_{mode}", {}).get("train_images_per_second")
                setup[f"ratio_vs_torch_{mode}"] = ours / theirs if ours and theirs else None
        self.result["wall_seconds"] = round(time.monotonic() - self.start, 1)

    def all(self, only: frozenset[str] = PARTS) -> dict[str, Any]:
        """The device, then in order of importance: the first setup on both sides, the rest of flaxvision, the
        rest of torch, the input pipeline (its time kept aside). `only`: the kinds of part to run (the device
        always runs: MFU needs it)."""
        (first_model, first_batches), *rest = self.plan.setups
        budget = self.plan.part_seconds
        ours, theirs = "flaxvision" in only, "torch" in only
        self.device()
        if ours:
            self.flaxvision(first_model, first_batches[0], 1.5 * budget)  # a cold start: the caches are empty
        if theirs:
            self.torch(first_model, first_batches)
        for model, batches in [(first_model, first_batches[1:]), *rest] if ours else ():
            for batch in batches:
                self.flaxvision(model, batch, budget)
        for model, batches in rest if theirs else ():
            self.torch(model, batches)
        if "input" in only:
            self.input_pipeline()
        self.summarise()
        return self.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--part", choices=["device", "torch", "jpegs"], help="(internal) run one part")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (also GPU_CHECK_TINY=1)")
    parser.add_argument("--only", default=",".join(sorted(PARTS)),
                        help="comma-separated parts to run: flaxvision, torch, input (default: all)")
    parser.add_argument("--models", default=None, help="comma-separated models of the plan to run (default: all)")
    parser.add_argument("--matmul-n", type=int, default=FULL.matmul_n)
    parser.add_argument("--model")
    parser.add_argument("--batches", default="")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=FULL.steps)
    parser.add_argument("--warmup", type=int, default=FULL.warmup)
    parser.add_argument("--compile-backend", default=FULL.compile_backend)
    parser.add_argument("--root")
    parser.add_argument("--per-class", type=int, default=FULL.jpegs_per_class)
    args = parser.parse_args()
    if args.part == "device":
        part_device(args.matmul_n)
    elif args.part == "torch":
        part_torch(args.model, [int(b) for b in args.batches.split(",")], args.img_size, args.steps, args.warmup,
                   args.compile_backend)
    elif args.part == "jpegs":
        part_jpegs(args.root, args.per_class)
    else:
        plan = TINY if args.tiny or os.environ.get("GPU_CHECK_TINY") == "1" else FULL
        only = frozenset(args.only.split(","))
        if not only <= PARTS:
            parser.error(f"--only {args.only}: choose from {', '.join(sorted(PARTS))}")
        if args.models:
            names = args.models.split(",")
            known = [model for model, _ in plan.setups]
            if not set(names) <= set(known):
                parser.error(f"--models {args.models}: this plan has {', '.join(known)}")
            plan = dataclasses.replace(plan, setups=tuple(s for s in plan.setups if s[0] in names))
        print(json.dumps(Run(plan).all(only)), flush=True)


if __name__ == "__main__":
    # The repo's src/ for this process and every child, also when run without gpu_check.sh.
    SRC = str(Path(__file__).resolve().parents[1] / "src")
    if SRC not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
        sys.path.insert(0, SRC)
    main()
