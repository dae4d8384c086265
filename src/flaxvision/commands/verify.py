"""`flaxvision verify SOURCE`: the converted model against the reference PyTorch implementation, on the same inputs.

Both models get the same images, decoded and normalised by the data pipeline's eval path
(`flaxvision.data.transforms.decode_eval`, then `flaxvision.data.device.device_preprocess`) with the preprocessing
saved with the weights; the command prints the largest and mean |logit difference|, top-1 / top-5 agreement and
both top-1 predictions, saves a side-by-side figure, and exits with 1 when the largest difference exceeds
--tolerance. Which references exist for a model its config says (`flaxvision.weights.layouts.verify_references`, preferred first).
The reference is built by the reference library from the weight files wherever it can read them itself
(transformers' from_pretrained on a transformers directory, timm's state dict or .npz loader); otherwise from
flaxvision's export of the weights (e.g. timm weights checked against transformers are exported to transformers'
files, which transformers then reads). Backbone-only weights (no classifier in the file, e.g. DINOv2, CLIP or SigLIP
towers) are compared on `model.features(x)` against what it equals in the reference (pooler_output, or the output
the weights' layout names in its `reference_features`), with no figure. torch, transformers and timm (the optional
`verify` extra) are imported here only.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision.errors import FlaxvisionError
from flaxvision.preprocessing import Preprocessing

REFERENCES = ("transformers", "timm")
DEFAULT_FIGURE = "flaxvision-verify.png"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "verify",
        help="compare converted weights with their PyTorch reference",
        description="Run the flaxvision model and the reference PyTorch implementation (transformers or timm) on the "
        "same preprocessed images and compare their logits. Exit code 1 when max |dlogits| > --tolerance.",
        epilog="examples:\n  flaxvision verify google/vit-base-patch16-224\n"
        "  flaxvision verify ./my-vit --image cat.jpg --image dog.jpg --figure check.png\n"
        "  flaxvision verify vit.npz --reference timm --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="Hub repo id (org/name[@revision]), directory, .safetensors or .npz file")
    parser.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image to compare on (repeatable); default: generated images"
    )
    parser.add_argument("--reference", choices=REFERENCES, help="reference implementation (default: the library the weights come from)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest acceptable max |dlogits| (default 1e-4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--figure", default=DEFAULT_FIGURE, help=f"side-by-side figure to write (default {DEFAULT_FIGURE}; '' for none)")
    parser.add_argument("--allow-pickle", action="store_true", help="read pickled PyTorch .bin/.pth files (trusted files only)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    parser.set_defaults(func=run)


# ---- inputs ------------------------------------------------------------------------------------------------------


def synthetic_images(count: int = 4, height: int = 240, width: int = 320, seed: int = 0) -> list[np.ndarray]:
    """Photograph-like test images (uint8 HWC): smooth colour gradients, soft shapes, texture and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    images = []
    for _ in range(count):
        corners = rng.uniform(0, 255, (4, 3))
        img = ((1 - u) * (1 - v))[..., None] * corners[0] + (u * (1 - v))[..., None] * corners[1]
        img = img + ((1 - u) * v)[..., None] * corners[2] + (u * v)[..., None] * corners[3]
        for _ in range(rng.integers(3, 7)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(15, height / 3), rng.uniform(15, width / 3)
            edge = np.clip(8 * (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 - 1), -30, 30)
            inside = 1 / (1 + np.exp(edge))  # soft-edged ellipse
            img = img * (1 - inside[..., None]) + inside[..., None] * rng.uniform(0, 255, 3)
        frequency = rng.uniform(0.02, 0.15)
        img = img + 12 * np.sin(frequency * x + rng.uniform(0, 6))[..., None] * np.sin(frequency * y)[..., None]
        img = img + rng.normal(0, 6, img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def read_images(paths: list[str]) -> list[np.ndarray]:
    """The images as they are (uint8 HWC RGB), for the figure; the model inputs are decoded by `preprocess`."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as err:
            raise FlaxvisionError(f"cannot read image '{path}': {err}; pass a JPEG/PNG/WebP file") from None
    return images


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # lossless: the decoded pixels are the array's
    return buffer.getvalue()


def _decode_eval(data: str | bytes, prep: Preprocessing) -> np.ndarray:
    """The data pipeline's eval decode: uint8 (img_size, img_size, channels) per `prep`."""
    from flaxvision.data import transforms

    return transforms.decode_eval(data, prep)


def preprocess(image: str | bytes | np.ndarray, prep: Preprocessing) -> np.ndarray:
    """One image (a path, encoded bytes or a uint8 HWC array) -> the model input (img_size, img_size, C) float32,
    exactly as `flaxvision evaluate` and the data pipeline prepare it."""
    import jax.numpy as jnp

    from flaxvision.data.device import device_preprocess
    from flaxvision.data.transforms import BadImage

    data = _png(image) if isinstance(image, np.ndarray) else image
    try:
        pixels = _decode_eval(data, prep)
    except BadImage as err:
        raise FlaxvisionError(f"cannot read image '{image if isinstance(image, str) else '<bytes>'}': {err}; pass a JPEG/PNG/WebP file") from None
    return np.asarray(device_preprocess(jnp.asarray(pixels[None]), prep.mean, prep.std)[0], dtype=np.float32)


# ---- the reference -------------------------------------------------------------------------------------------------


def reference_model(kind: str, model: Any, report: Any, *, allow_pickle: bool = False, features: bool = False) -> Any:
    """The PyTorch reference for loaded pretrained weights, in eval mode, float32: a callable on NCHW tensors.

    Built from the library's own files: the source files when they are in that library's format, else
    flaxvision's export of the weights (`flaxvision.weights.layouts` writes them), so that the reference library
    reads every tensor itself. transformers: the class config.json names in "architectures"; timm:
    `create_model(architecture, **model_args)` with the state dict (or timm's own .npz reader).

    Args:
      kind: "transformers" or "timm".
      model, report: what `load_pretrained(..., return_report=True)` returned.
      features: return what flaxvision's `model.features` equals (backbone weights, no classifier) instead of the
        logits: the transformers layout's `reference_features` (else pooler_output), timm's pre-logits; the
        callable's `output` names it.
    """
    import torch

    from flaxvision.weights.convert import weight_state
    from flaxvision.weights.hub import read_tensors
    from flaxvision.weights.layouts import writer

    config = model.config
    files = tuple(Path(f) for f in report.files)

    def flax_params() -> dict[str, np.ndarray]:
        return {k: np.asarray(v, np.float32) for k, v in weight_state(model).items()}

    if kind == "transformers":
        import transformers

        directory = files[0].parent
        if report.format == "transformers" and (directory / "config.json").is_file():
            return _transformers_reference(transformers, directory, features)
        from flaxvision.weights.export import save_pretrained

        with tempfile.TemporaryDirectory(prefix="flaxvision-verify-") as exported:
            save_pretrained(model, exported, format="transformers")  # transformers then reads the files itself
            return _transformers_reference(transformers, Path(exported), features)

    import timm

    layout = writer(kind, config)
    timm_config = layout.config_files(config, model.preprocessing, model.label_names)["config.json"]
    reference = timm.create_model(timm_config["architecture"], pretrained=False, **timm_config["model_args"])
    if report.format == "npz":
        from timm.models.vision_transformer import _load_weights

        _load_weights(reference, str(files[0]))  # timm's own reader of Google's .npz layout
    elif report.format == "timm":
        tensors, _ = read_tensors(files, allow_pickle)
        reference.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in tensors.items()}, strict=True)
    else:
        state = layout.from_flaxvision(flax_params(), config)
        reference.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()}, strict=True)
    timm_model: Any = reference.eval()
    if features:
        return Reference(lambda x: (timm_model.forward_head(timm_model.forward_features(x), pre_logits=True), "pre-logits features"))
    return timm_model


class Reference:
    """A reference model as a callable on NCHW tensors; `output` names what it returns."""

    def __init__(self, forward: Any, output: str = "logits"):
        self.forward, self.output = forward, output

    def __call__(self, x: Any) -> Any:
        result, self.output = self.forward(x)
        return result


def _transformers_reference(transformers: Any, directory: Path, features: bool = False) -> Reference:
    import torch

    from flaxvision.weights.gray_stem import MARKER
    from flaxvision.weights.layouts import writers

    info = json.loads((directory / "config.json").read_text())
    architecture = (info.get("architectures") or ["AutoModelForImageClassification"])[0]
    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise FlaxvisionError(f"this transformers has no {architecture} (named in {directory / 'config.json'}); upgrade transformers")
    module = cls.from_pretrained(directory, dtype=torch.float32).eval()
    # A 1-channel model's export has a luma-tiled 3-channel stem (weights.gray_stem): gray pixels, repeated.
    gray = isinstance(info.get(MARKER), dict)

    def rgb(x: Any) -> Any:
        return x.expand(-1, 3, -1, -1) if gray and x.shape[1] == 1 else x

    if not features:
        return Reference(lambda x: (module(pixel_values=rgb(x)).logits, "logits"))
    # The layout of the file's model_type says which output flaxvision's features equal (default: pooler_output).
    layout = next((m for m in writers("transformers") if info.get("model_type") in m.MODEL_TYPES), None)
    if layout is not None and hasattr(layout, "reference_features"):
        return Reference(lambda x: layout.reference_features(module, rgb(x)))
    return Reference(lambda x: (module(pixel_values=rgb(x)).pooler_output, "pooler_output"))


# ---- comparison --------------------------------------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def compare(model: Any, reference: Any, inputs: np.ndarray, *, features: bool = False) -> dict[str, Any]:
    """Logits (`features`: `model.features`) of both models on NHWC `inputs` and the agreement statistics (keys as
    `--json`; top-1/top-5 agreement and the probabilities for logits only)."""
    import jax.numpy as jnp
    import torch

    ours = np.asarray(_forward(features)(model, jnp.asarray(inputs)), dtype=np.float64)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(np.ascontiguousarray(inputs.transpose(0, 3, 1, 2)))).double().numpy()
    if ours.shape != theirs.shape:
        raise FlaxvisionError(f"flaxvision's output {ours.shape} and the reference's {theirs.shape} differ in shape; nothing to compare")
    diff = np.abs(ours - theirs)
    result = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    if features:
        return result
    k = min(5, ours.shape[-1])
    top_ours, top_theirs = np.argsort(-ours, axis=-1)[:, :k], np.argsort(-theirs, axis=-1)[:, :k]
    return {
        **result,
        "top1_agree": float(np.mean(top_ours[:, 0] == top_theirs[:, 0])),
        "top5_agree": float(np.mean([set(a) == set(b) for a, b in zip(top_ours, top_theirs, strict=True)])),
        "flaxvision_probs": _softmax(ours),
        "reference_probs": _softmax(theirs),
    }


@functools.cache
def _forward(features: bool) -> Any:
    """The model's logits (or features) as one compiled function, cached per model graph and input shape (run
    eagerly, every operation would be compiled on its own: seconds for a small ViT)."""
    from flax import nnx

    return nnx.jit(lambda model, x: model.features(x) if features else model(x))


def _label(names: tuple[str, ...] | None, index: int) -> str:
    return names[index] if names else f"class {index}"


def save_figure(path: Path, images: list[np.ndarray], rows: list[dict[str, Any]], result: dict[str, Any], reference: str) -> None:
    """Each image with the flaxvision and the reference top-1 prediction under it (green: same class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.8), squeeze=False)
    for ax, image, row in zip(axes[0], images, rows, strict=True):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_xticks([])
        ax.set_yticks([])
        (ours, p_ours), (theirs, p_theirs) = row["flaxvision"], row["reference"]
        ax.set_title(
            f"flaxvision: {ours} ({p_ours:.1%})\n{reference}: {theirs} ({p_theirs:.1%})",
            fontsize=8,
            color="green" if ours == theirs else "red",
        )
    fig.suptitle(f"max |dlogits| {result['max_abs_diff']:.2e}, top-1 agreement {result['top1_agree']:.0%}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from flaxvision.models.registry import name_of
    from flaxvision.weights.hub import read_weights
    from flaxvision.weights.layouts import parse_weights, verify_references
    from flaxvision.weights.loader import load_pretrained

    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise FlaxvisionError(f"verify needs the reference libraries ({err.name} is missing): pip install 'flaxvision[verify]'") from None

    # Backbone-only weights (no classifier) are compared on their features: the model gets a 1-class head to load.
    weights = read_weights(args.source, allow_pickle=args.allow_pickle, revision=args.revision)
    backbone = not parse_weights(weights).has_head
    del weights
    model, report = load_pretrained(args.source, allow_pickle=args.allow_pickle, revision=args.revision,
                                    num_classes=1 if backbone else None, return_report=True)  # fmt: skip
    references = verify_references(model.config)
    if report.format == "transformers" and "transformers" not in references and (Path(report.files[0]).parent / "config.json").is_file():
        references = ("transformers", *references)  # transformers reads its own files, exportable or not
    if not references:
        raise FlaxvisionError(
            f"verify compares a model with its PyTorch reference ({'/'.join(REFERENCES)}); there is none for "
            f"{name_of(model.config)}, which '{args.source}' holds"
        )
    if args.reference and args.reference not in references:
        raise FlaxvisionError(f"--reference {args.reference} cannot build a {type(model).__name__}; use {' or '.join(references)}")
    model.eval()
    kind = args.reference or (report.format if report.format in references else references[0])
    # (a LayerNorm eps a timm layout cannot hold is that layout's warning, when the reference files are written)
    reference = reference_model(kind, model, report, allow_pickle=args.allow_pickle, features=backbone)
    images = read_images(args.image) if args.image else synthetic_images()
    sources = args.image or images  # files are decoded from the files themselves, as `evaluate` would
    inputs = np.stack([preprocess(source, model.preprocessing) for source in sources])
    result = compare(model, reference, inputs, features=backbone)
    compared = f"features(x) vs the reference's {getattr(reference, 'output', 'logits')}" if backbone else "logits"

    rows = []
    for flax_probs, ref_probs in zip(result.pop("flaxvision_probs", ()), result.pop("reference_probs", ()), strict=True):
        a, b = int(flax_probs.argmax()), int(ref_probs.argmax())
        names = model.label_names
        rows.append({"flaxvision": [_label(names, a), float(flax_probs[a])], "reference": [_label(names, b), float(ref_probs[b])]})
    passed = result["max_abs_diff"] <= args.tolerance
    figure = Path(args.figure) if args.figure and not backbone else None  # a backbone has no predictions to show
    if figure is not None:
        save_figure(figure, images, rows, result, kind)
    summary = {**result, "tolerance": args.tolerance, "passed": passed, "source": str(args.source), "format": report.format,
               "reference": kind, "compared": "features" if backbone else "logits", "reference_output": compared,
               "num_images": len(images), "figure": str(figure) if figure else None, "predictions": rows}  # fmt: skip
    what = "|dfeatures|" if backbone else "|dlogits|"
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{report.format} weights {args.source} vs {kind}, {len(images)} image(s) at {model.config.img_size} px")
        if backbone:
            print(f"backbone-only weights (no classifier): compared flaxvision's {compared}")
            print(f"max {what} {result['max_abs_diff']:.3e}   mean {what} {result['mean_abs_diff']:.3e}")
        else:
            print(f"max |dlogits| {result['max_abs_diff']:.3e}   mean |dlogits| {result['mean_abs_diff']:.3e}   "
                  f"top-1 agreement {result['top1_agree']:.0%}   top-5 agreement {result['top5_agree']:.0%}")  # fmt: skip
        for i, row in enumerate(rows):
            print(f"  image {i}: flaxvision {row['flaxvision'][0]} ({row['flaxvision'][1]:.2%})   "
                  f"{kind} {row['reference'][0]} ({row['reference'][1]:.2%})")  # fmt: skip
        if figure:
            print(f"figure: {figure}")
        print(("PASS" if passed else "FAIL") + f": max {what} {'<=' if passed else '>'} tolerance {args.tolerance:g}")
    return 0 if passed else 1
