"""`export --format stablehlo`: a model's inference function (flaxvision.ship.program) as a `jax.export` artifact.

`to_stablehlo` writes two files into a directory: `model.jax_export` (`jax.export.export(...).serialize()`: the
StableHLO program with the weights inside, lowered for each of `platforms`, with a symbolic batch dimension) and
`metadata.json` (program.metadata plus the platforms, the jax version that wrote it and the calling convention
version). Running it needs only `jax` (any later version that still reads that calling convention); this loader
applies the model's eval resize and centre crop with PIL, as `flaxvision predict` does:

    import json, numpy as np, jax
    from PIL import Image
    exported = jax.export.deserialize(open("out/model.jax_export", "rb").read())
    meta = json.load(open("out/metadata.json")); p = meta["preprocessing"]
    img = Image.open("cat.jpg").convert("RGB"); w, h = img.size
    cw, ch = (w * p["crop_pct"], h * p["crop_pct"]) if p["resize_mode"] == "squash" else (min(w, h) * p["crop_pct"],) * 2
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    x = np.asarray(img.resize((p["img_size"],) * 2, Image.Resampling[p["interpolation"].upper()], box=box))[None]
    logits = np.asarray(exported.call(x))  # (1, num_classes) float32; any batch size works
    print(meta["labels"][int(logits[0].argmax())])

(uint8 input, the default; a program exported with --input float takes NCHW normalised float32 instead, and one
exported with --input-size HxW takes HxW images and resizes them itself.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from flaxvision import files
from flaxvision.errors import FlaxvisionError
from flaxvision.ship import program

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
PROGRAM_FILE = "model.jax_export"
METADATA_FILE = "metadata.json"
BATCH_DIM = "batch"


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    """The platform names, validated (known, no repeats, at least one), in the order given."""
    names = tuple(platforms)
    unknown = [p for p in names if p not in PLATFORMS]
    if unknown or not names or len(set(names)) != len(names):
        raise FlaxvisionError(f"--platforms {','.join(names) or '(empty)'}: give distinct names from "
                              f"{', '.join(PLATFORMS)}, comma-separated (e.g. cpu,cuda,tpu)")  # fmt: skip
    return names


def export_program(model: Any, *, input: str = "uint8", input_size: tuple[int, int] | None = None,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS) -> tuple[Any, program.ProgramSpec]:
    """The `jax.export.Exported` of `model`'s program for `platforms` (symbolic batch), and its input spec."""
    platforms = check_platforms(platforms)
    fn, spec = program.inference_function(model, input, input_size)
    (batch,) = jax.export.symbolic_shape(BATCH_DIM)
    arg = jax.ShapeDtypeStruct(spec.shape(batch), spec.dtype)
    try:
        exported = jax.export.export(jax.jit(fn), platforms=platforms)(arg)
    except Exception as err:  # a lowering rule missing for one platform, a shape that needs a static batch ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FlaxvisionError(f"StableHLO export of a {model.family} model for {','.join(platforms)} failed: "
                              f"{first}; try fewer --platforms") from None  # fmt: skip
    return exported, spec


def to_stablehlo(model: Any, out_dir: str | Path, *, input: str = "uint8", input_size: tuple[int, int] | None = None,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS, source: str | None = None) -> Path:
    """Write `model.jax_export` and `metadata.json` into `out_dir` (created if missing; files written atomically)
    and return the program's path. See the module docstring for a loader that needs only jax."""
    exported, spec = export_program(model, input=input, input_size=input_size, platforms=platforms)
    meta = program.metadata(model, spec, format="stablehlo", source=source)
    meta["stablehlo"] = {"platforms": list(exported.platforms), "jax_version": jax.__version__,
                         "calling_convention_version": exported.calling_convention_version,
                         "file": PROGRAM_FILE}  # fmt: skip
    out = files.make_dirs(out_dir)
    path = files.write_atomic(out / PROGRAM_FILE, bytes(exported.serialize()))
    files.write_atomic(out / METADATA_FILE, json.dumps(meta, indent=2) + "\n")
    return path
