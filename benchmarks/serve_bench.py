"""`flaxvision serve` throughput and latency, beside the same model run by onnxruntime in-process (the ceiling).

    python benchmarks/serve_bench.py                         # ViT-Ti/16, 224 px, 1000 classes, random weights
    python benchmarks/serve_bench.py --duration 20 --clients 1 16 --max-batch 32 --max-wait-ms 5 --json

Server: `flaxvision serve` started as its own process on 127.0.0.1 (model saved with save_pretrained to a temp
dir), driven by N client threads of this process (httpx, one keep-alive connection each), each posting one
224 x 224 JPEG per request (raw body, image/jpeg) in a closed loop for --duration seconds after a warm-up; the
client threads share the machine's cores with the server, as a co-located client would. Reported: images/s and
p50/p99 request latency, and from GET /health the mean images per device batch.

Ceiling: the same program (`program.inference_function(model, "uint8")`, normalisation inside) exported to ONNX
(`flaxvision.ship.onnx_export.to_onnx`) and run by onnxruntime in this process
at batch 1 and 16, "model only" (pre-decoded uint8 arrays) and "decode+model" (decode_eval of the JPEG bytes, one
thread, then the run). For the analysis: decode_eval alone per image, and the server's own jitted program in this
process at batch 1 and 16 (model only), all measured after the server has stopped.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        return f"{name} ({os.cpu_count()} logical CPUs)"
    except (OSError, StopIteration):
        return "unknown CPU"


def jpeg_224() -> bytes:
    from flaxvision.data.synthetic import photo

    rng = np.random.default_rng(0)
    image = photo(rng, 224, 224)
    pixels = np.asarray(image, np.int16) + rng.normal(0, 10, (224, 224, 1)).astype(np.int16)  # photo-like grain
    out = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def start_server(model_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, float]:
    cmd = [sys.executable, "-m", "flaxvision", "serve", str(model_dir), "--port", "0", "--max-batch",
           str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # its log (stderr) goes to ours
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start (its log is above): {line}")
    threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()  # keep the pipe drained
    return proc, line.split(" on ", 1)[1].split(" ", 1)[0], time.perf_counter() - start


def drive(url: str, data: bytes, clients: int, duration: float, warmup: float) -> dict[str, Any]:
    """`clients` closed-loop client threads for warmup + duration seconds; requests finished in the timed window."""
    import httpx

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.5
    window = (t0 + warmup, t0 + warmup + duration)

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while time.perf_counter() < t0:
                time.sleep(0.001)
            while True:
                start = time.perf_counter()
                if start >= window[1]:
                    return
                r = http.post(f"{url}/predict", content=data, headers={"content-type": "image/jpeg"},
                              params={"top_k": 5})  # fmt: skip
                end = time.perf_counter()
                with lock:
                    if r.status_code != 200:
                        errors[0] += 1
                    elif start >= window[0] and end <= window[1]:
                        latencies.append(end - start)

    before = httpx.get(f"{url}/health").json()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(f"{url}/health").json()
    batches = after["batches"] - before["batches"]
    latencies.sort()
    if not latencies:
        raise SystemExit(f"no request of {clients} client(s) finished in the {duration:g} s window; raise --duration")
    return {"clients": clients, "images_per_s": len(latencies) / duration, "requests": len(latencies),
            "p50_ms": 1e3 * statistics.median(latencies), "p99_ms": 1e3 * percentile(latencies, 99),
            "mean_batch": (after["images"] - before["images"]) / max(batches, 1), "errors": errors[0],
            "compiled_shapes": after["compiled_shapes"]}  # fmt: skip


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of sorted values."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def timed(fn, rounds: int) -> tuple[float, float]:
    """(median, p99) seconds of `rounds` calls, after two warm-up calls."""
    fn()
    fn()
    runs = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    runs.sort()
    return statistics.median(runs), percentile(runs, 99)


def export_onnx(model: Any, path: Path) -> None:
    from flaxvision.ship.onnx_export import to_onnx

    to_onnx(model, path, input="uint8")  # checked against JAX by onnxruntime before it is written


def in_process(model: Any, data: bytes, onnx_path: Path, rounds: int) -> dict[str, Any]:
    import jax
    import onnxruntime as ort

    from flaxvision.data.transforms import decode_eval
    from flaxvision.ship.program import inference_function

    prep = model.preprocessing
    image = decode_eval(data, prep)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    fn, _ = inference_function(model, "uint8")
    program = jax.jit(lambda x: jax.nn.softmax(fn(x), axis=-1))
    out: dict[str, Any] = {"decode_ms": 1e3 * timed(lambda: decode_eval(data, prep), rounds * 4)[0]}
    for batch in (1, 16):
        images = np.stack([image] * batch)
        ort_model = timed(lambda images=images: session.run(None, {name: images}), rounds)
        decoded = lambda batch=batch: np.stack([decode_eval(data, prep) for _ in range(batch)])
        ort_full = timed(lambda decoded=decoded: session.run(None, {name: decoded()}), rounds)
        jax_model = timed(lambda images=images: np.asarray(program(images)), rounds)
        for key, (median, p99) in (("onnxruntime", ort_model), ("onnxruntime+decode", ort_full), ("jax", jax_model)):
            out[f"{key} b{batch}"] = {"images_per_s": batch / median, "p50_ms": 1e3 * median, "p99_ms": 1e3 * p99}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--duration", type=float, default=15.0, help="timed seconds per client count")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=30, help="timed calls per in-process measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import flaxvision
    from flaxvision.weights import save_pretrained

    print(f"command: {' '.join([sys.executable, *sys.argv])}", flush=True)
    print(f"cpu: {cpu_model()}", flush=True)
    data = jpeg_224()
    result: dict[str, Any] = {"model": args.model, "cpu": cpu_model(), "jpeg_bytes": len(data),
                              "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model = flaxvision.create_model(args.model, num_classes=1000)
        save_pretrained(model, Path(tmp) / "model")
        proc, url, startup = start_server(Path(tmp) / "model", args)
        result["server_start_s"] = startup
        try:
            result["serve"] = [drive(url, data, n, args.duration, args.warmup) for n in args.clients]
        finally:
            proc.send_signal(signal.SIGTERM)
            result["server_exit"] = proc.wait(60)
        start = time.perf_counter()
        export_onnx(model, Path(tmp) / "model.onnx")
        result["onnx_export_s"] = time.perf_counter() - start
        result["in_process"] = in_process(model, data, Path(tmp) / "model.onnx", args.rounds)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}, 1000 classes, random weights; one {len(data)}-byte 224x224 JPEG per request; server "
          f"--max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}, ready in {startup:.1f} s, SIGTERM exit "
          f"{result['server_exit']}")  # fmt: skip
    print(f"{'':34s} {'images/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for row in result["serve"]:
        print(f"{'flaxvision serve, ' + str(row['clients']) + ' client(s)':34s} {row['images_per_s']:9.1f} "
              f"{row['p50_ms']:8.1f} {row['p99_ms']:8.1f}   mean batch {row['mean_batch']:.1f}, "
              f"{row['errors']} errors, {row['compiled_shapes']} compiled shapes")  # fmt: skip
    print(f"in process (ONNX export by flaxvision.ship.onnx_export.to_onnx in {result['onnx_export_s']:.0f} s):")
    for key, row in result["in_process"].items():
        if key != "decode_ms":
            print(f"  {key:32s} {row['images_per_s']:9.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f}")
    print(f"  decode_eval of the JPEG alone: {result['in_process']['decode_ms']:.2f} ms per image (one thread)")


if __name__ == "__main__":
    main()
