"""`flaxvision predict`: top-k labels with probabilities for image files; unreadable files are reported, not fatal."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flaxvision.errors import FlaxvisionError

EPILOG = """examples:
  flaxvision predict runs/digits-vit-20261122-101500 digit0.png digit1.png
  flaxvision predict runs/food/model photos/ --top-k 3 --json
  flaxvision predict runs/food/model photos/ --explain gradcam --out heatmaps/

--explain writes one PNG per image, DIR/<image stem>_<method>.png: the heat map coloured over the image at the
model's input resolution, on the crop the model sees (the eval resize and centre crop). rollout (attention
rollout) works on ViTs, gradcam (Grad-CAM of the predicted class) on cnn, resnet and convnext models. Images with
the same stem (in different folders) get -2, -3 ... in the order given; a file of the same name in DIR is replaced."""

def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "predict", help="classify image files", epilog=EPILOG,
        description="Top-k labels with probabilities for each image (directories are searched for images).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("model", metavar="MODEL_DIR", help="a run directory, a model directory or a Hub id")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw",
                        help="a run trained with --ema-decay: its raw weights (default) or their EMA")  # fmt: skip
    parser.add_argument("--json", action="store_true",
                        help="print [{path, predictions: [{label, probability}]}] (with --explain also explanation: its PNG)")  # fmt: skip
    parser.add_argument("--explain", choices=("rollout", "gradcam"), metavar="{rollout,gradcam}",
                        help="also write a heat-map overlay of each image to --out (see below)")  # fmt: skip
    parser.add_argument("--out", metavar="DIR", help="the directory for --explain's overlays (created if missing)")
    parser.set_defaults(func=run)


def _expand(paths: list[str]) -> list[Path]:
    from flaxvision.data.transforms import IMAGE_SUFFIXES

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from flaxvision.commands.common import class_names_of, load_model
    from flaxvision.data.device import DeviceStage, pad_batch
    from flaxvision.data.transforms import BadImage, decode_eval

    if args.top_k < 1:
        raise FlaxvisionError(f"--top-k must be >= 1, got {args.top_k}")
    out = _check_explain(args)
    paths = _expand(args.images)
    if not paths:
        raise FlaxvisionError(f"no image files in {' '.join(args.images)}")
    model = load_model(args.model, weights=args.weights)
    writer = None
    if out is not None:
        from flaxvision.explain import OverlayWriter

        writer = OverlayWriter(model, args.explain, out, paths)  # refuses a method the model cannot do
    names = class_names_of(model)
    pre = model.preprocessing
    stage = DeviceStage(pre, devices=jax.devices()[:1], dtype=model.config.dtype)
    forward = jax.jit(lambda x: jax.nn.softmax(model(stage.eval_inputs(x)), axis=-1))
    prepare = jax.jit(stage.eval_inputs)
    results: list[dict] = []
    decoded: list[tuple[int, np.ndarray]] = []
    for path in paths:
        try:
            decoded.append((len(results), decode_eval(str(path), pre)))
            results.append({"path": str(path), "predictions": None})
        except (BadImage, OSError) as err:
            results.append({"path": str(path), "error": f"unreadable: {err}"})
            print(f"flaxvision: skipped {path}: unreadable ({err})", file=sys.stderr)
    k = min(args.top_k, len(names))
    for start in range(0, len(decoded), args.batch_size):
        chunk = decoded[start : start + args.batch_size]
        batch = {"image": np.stack([image for _, image in chunk]), "label": np.zeros(len(chunk), np.int32)}
        padded = stage.put({"image": pad_batch(batch, args.batch_size)["image"]})  # one shape: one compilation
        probs = np.asarray(forward(padded["image"]))[: len(chunk)]
        if writer is not None:
            written = writer.write(prepare(padded["image"]), batch["image"], [index for index, _ in chunk])
            for (index, _), path in zip(chunk, written):
                results[index]["explanation"] = str(path)
        for (index, _), p in zip(chunk, probs):
            top = np.argsort(-p)[:k]
            results[index]["predictions"] = [{"label": names[i], "probability": float(p[i])} for i in top]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: {r['error']}")
                continue
            shown = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in r["predictions"])
            print(f"{r['path']}: {shown}")
    if writer is not None and decoded:
        print(f"flaxvision: wrote {len(decoded)} {args.explain} overlay{'s' if len(decoded) > 1 else ''} to {out}", file=sys.stderr)
    return 0 if decoded else 1


def _check_explain(args: argparse.Namespace) -> Path | None:
    """The --out directory when --explain is given (checked, not yet created), None without it."""
    if args.explain is None:
        if args.out is not None:
            raise FlaxvisionError(f"--out {args.out} is where --explain writes its overlays; add --explain rollout or gradcam")
        return None
    if args.out is None:
        raise FlaxvisionError(f"--explain {args.explain} writes one overlay per image: give the directory with --out DIR")
    from flaxvision.explain import check_out_dir

    return check_out_dir(args.out)

