"""Train-step benchmark: flaxvision against the reference PyTorch implementation, same batch, size and optimizer.

Each side runs in its own fresh process (so peak memory and thread pools do not mix), one after the other:

    python -m flaxvision.train.benchmark --model vit_base_patch16_224 --batch-size 8      # or `flaxvision bench train`

Measured per side: train images/s (SGD with momentum 0.9, steps timed after warm-up), eval images/s (forward only;
torch under inference_mode), compilation (flaxvision: trace + lower + XLA compile of the train step, ahead of
time) and the time to the first step (compilation + the first run), and peak memory (the device's peak bytes where
it reports them, else the growth of the process's peak RSS after imports). The machine's float32 matmul roofline
(a large square matmul under XLA) turns model FLOP/s into a fraction. Both sides run with the same environment,
including glibc's huge-page tunable where flaxvision uses it (flaxvision.host_memory; torch's speed does not change
with it on the development machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from flaxvision import host_memory

TRAIN_FLOPS_FACTOR = 3  # backward ~ 2 x forward


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def matmul_roofline(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """GFLOP/s of an n x n x n matmul of `dtype` under XLA, best of `repeats`."""
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _flaxvision(model: str, batch: int, img_size: int, dtype: str, steps: int, warmup: int, remat: str | None) -> dict[str, Any]:
    import jax
    import numpy as np

    import flaxvision
    from flaxvision.train import TrainConfig, Trainer
    from flaxvision.train.evaluation import Evaluator

    base_rss = _rss_now_mb()
    extra: dict[str, Any] = {"remat": remat} if remat else {}
    net = flaxvision.create_model(model, img_size=img_size, dtype=dtype, **extra)
    config = TrainConfig(model=model, batch_size=batch, eval_batch_size=batch, optimizer="sgd", lr=1e-3, momentum=0.9)
    trainer = Trainer(config, net, steps_per_epoch=steps + warmup + 1, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, img_size, img_size, net.config.in_chans), dtype=np.uint8)
    batch_on_device = trainer.stage.put({"image": images, "label": np.arange(batch) % net.config.num_classes})
    start = time.perf_counter()
    step = trainer.train_step.lower(trainer.state, batch_on_device).compile()  # what the first call would compile
    compile_seconds = time.perf_counter() - start
    trainer.state = step(trainer.state, batch_on_device)
    jax.block_until_ready(trainer.state)
    first_step_seconds = time.perf_counter() - start
    for _ in range(warmup):
        trainer.state = step(trainer.state, batch_on_device)
    jax.block_until_ready(trainer.state)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.state = step(trainer.state, batch_on_device)
    jax.block_until_ready(trainer.state)
    train_ips = steps * batch / (time.perf_counter() - start)

    evaluator = Evaluator(trainer.current_model(), batch_size=batch, devices=jax.devices()[:1])
    eval_batch = evaluator.stage.put({"image": images, "label": np.zeros(batch, np.int32), "mask": np.ones(batch, bool)})
    for _ in range(warmup + 1):
        out = evaluator.eval_step(evaluator.state, eval_batch)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = evaluator.eval_step(evaluator.state, eval_batch)
    jax.block_until_ready(out)
    eval_ips = steps * batch / (time.perf_counter() - start)

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "train_images_per_second": train_ips,
        "eval_images_per_second": eval_ips,
        "compile_seconds": compile_seconds,
        "first_step_seconds": first_step_seconds,
        "remat": getattr(net.config, "remat", None),
        "huge_pages": "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""),
        "peak_memory_mb": peak / 2**20 if peak else _rss_peak_mb() - base_rss,
        "memory_measure": "device peak_bytes_in_use" if peak else "process peak RSS growth",
        "forward_gflops": net.config.forward_flops() / 1e9,
        "device": str(jax.devices()[0]),
    }


def _transformers(model: str, batch: int, img_size: int, steps: int, warmup: int) -> dict[str, Any]:
    import torch
    import transformers

    import flaxvision

    cfg = flaxvision.model_config(model, img_size=img_size)
    if not isinstance(cfg, flaxvision.models.ViTConfig):
        raise SystemExit(f"no transformers reference for {model}")
    base_rss = _rss_now_mb()
    torch.manual_seed(0)
    net = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
        image_size=img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans, num_labels=cfg.num_classes,  # pyright: ignore[reportCallIssue]  num_labels: a PretrainedConfig keyword ViTConfig's annotations omit
        layer_norm_eps=cfg.layer_norm_eps, qkv_bias=cfg.qkv_bias))  # fmt: skip
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, cfg.in_chans, img_size, img_size)
    labels = torch.arange(batch) % cfg.num_classes

    def step():
        optimizer.zero_grad(set_to_none=True)
        net(pixel_values=images, labels=labels).loss.backward()
        optimizer.step()

    net.train()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    train_ips = steps * batch / (time.perf_counter() - start)
    net.eval()
    with torch.inference_mode():
        for _ in range(warmup + 1):
            net(pixel_values=images)
        start = time.perf_counter()
        for _ in range(steps):
            net(pixel_values=images)
        eval_ips = steps * batch / (time.perf_counter() - start)
    return {
        "train_images_per_second": train_ips, "eval_images_per_second": eval_ips, "first_step_seconds": first,
        "peak_memory_mb": _rss_peak_mb() - base_rss, "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }  # fmt: skip


def _child(side: str, *, timeout: float | None = None, **kwargs: Any) -> dict[str, Any] | None:
    """Run one side in a fresh interpreter; None when its library is not installed.

    Raises subprocess.TimeoutExpired (the child killed) after `timeout` seconds (benchmarks/gpu_check.py).
    """
    cmd = [sys.executable, "-m", "flaxvision.train.benchmark", "--side", side, "--json"]
    for key, value in kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=host_memory.environment() or os.environ,
                            timeout=timeout)  # fmt: skip
    if result.returncode != 0:
        if "ModuleNotFoundError" in result.stderr or "no transformers reference" in result.stderr:
            return None
        raise RuntimeError(f"benchmark side {side!r} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark_train(model: str = "vit_base_patch16_224", batch_size: int = 8, img_size: int = 224,
                    dtype: str = "float32", steps: int = 5, warmup: int = 2, reference: bool = True,
                    remat: str | None = None) -> dict[str, Any]:
    """Both sides and the roofline; the keys of `flaxvision bench train --json`."""
    common: dict[str, Any] = dict(model=model, batch_size=batch_size, img_size=img_size, steps=steps, warmup=warmup)
    ours = _child("flaxvision", dtype=dtype, **({"remat": remat} if remat else {}), **common)
    if ours is None:
        raise RuntimeError("the flaxvision side of the training benchmark could not run (a module is missing)")
    ref = _child("transformers", **common) if reference else None
    roofline = matmul_roofline()
    train_flops = TRAIN_FLOPS_FACTOR * ours["forward_gflops"] * ours["train_images_per_second"]
    return {
        **{k: ours[k] for k in ("train_images_per_second", "eval_images_per_second", "compile_seconds",
                                "first_step_seconds", "peak_memory_mb")},
        "roofline_fraction": train_flops / roofline,
        "eval_roofline_fraction": ours["forward_gflops"] * ours["eval_images_per_second"] / roofline,
        "roofline_gflops": roofline,
        "reference_train_images_per_second": ref["train_images_per_second"] if ref else None,
        "reference_eval_images_per_second": ref["eval_images_per_second"] if ref else None,
        "reference_peak_memory_mb": ref["peak_memory_mb"] if ref else None,
        "reference": "transformers ViTForImageClassification" if ref else None,
        "model": model, "batch_size": batch_size, "img_size": img_size, "dtype": dtype,
        "memory_measure": ours["memory_measure"], "device": ours["device"], "huge_pages": ours["huge_pages"],
        "remat": ours["remat"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--side", choices=["flaxvision", "transformers"], default=None)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default=None, choices=["none", "dots", "full"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    common = dict(model=args.model, batch=args.batch_size, img_size=args.img_size, steps=args.steps, warmup=args.warmup)
    if args.side == "flaxvision":
        result = _flaxvision(dtype=args.dtype, remat=args.remat, **common)
    elif args.side == "transformers":
        result = _transformers(**common)
    else:
        result = benchmark_train(args.model, args.batch_size, args.img_size, args.dtype, args.steps, args.warmup,
                                 remat=args.remat)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
