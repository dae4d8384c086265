"""Train step: flaxvision against transformers-PyTorch for the setups BENCHMARKS.md reports, as one table.

    python benchmarks/train_step.py                   # ViT-B/16 b8, ViT-B/16 b8 remat=full, ViT-Ti/16 b32
    python benchmarks/train_step.py --steps 8 --json  # more timed steps; the raw results as JSON lines

Each setup is `flaxvision bench train` (flaxvision.train.benchmark.benchmark_train): both sides in fresh processes
one after the other, same batch, 224 px, float32, SGD with momentum 0.9, and the XLA float32 matmul roofline. Run
it through this script or the CLI so that both sides get glibc's huge-page tunable (flaxvision.host_memory).
"""

from __future__ import annotations

import argparse
import json

from flaxvision import host_memory
from flaxvision.train.benchmark import benchmark_train

SETUPS = (
    ("vit_base_patch16_224", 8, None),
    ("vit_base_patch16_224", 8, "full"),
    ("vit_tiny_patch16_224", 32, None),
)


def row(r: dict) -> str:
    ref_train, ref_eval = r["reference_train_images_per_second"], r["reference_eval_images_per_second"]
    return (
        f"| {r['model']} b{r['batch_size']} remat={r['remat']} | {r['train_images_per_second']:.2f} | {ref_train:.2f} | "
        f"{r['train_images_per_second'] / ref_train:.2f}x | {r['roofline_fraction']:.0%} | "
        f"{r['eval_images_per_second']:.2f} | {ref_eval:.2f} | {r['eval_images_per_second'] / ref_eval:.2f}x | "
        f"{r['compile_seconds']:.1f} s | {r['peak_memory_mb']:.0f} / {r['reference_peak_memory_mb']:.0f} MB |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    host_memory.restart_with_huge_pages()
    print("| setup | train img/s | reference | ratio | roofline | eval img/s | reference | ratio | compile | peak memory |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model, batch, remat in SETUPS:
        r = benchmark_train(model, batch, steps=args.steps, warmup=args.warmup, remat=remat)
        print(json.dumps(r) if args.json else row(r), flush=True)


if __name__ == "__main__":
    main()
