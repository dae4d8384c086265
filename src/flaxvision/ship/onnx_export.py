"""`export --format onnx`: a model's inference function (flaxvision.ship.program) as an ONNX model, via jax2onnx.

jax2onnx converts the jaxpr of the function (no TensorFlow in the way); the batch dimension is the symbolic "batch"
dimension of the ONNX input. The program's metadata (labels, preprocessing, input and output description) goes
into the model's metadata_props: the whole JSON under "flaxvision", and "labels" and "preprocessing" on their own
for tools that read only those. With `check=True` (the default) the converted model runs in onnxruntime on a small
random batch before it is written, and a mismatch with JAX beyond `TOLERANCE` is an error: nothing is written.

    >>> to_onnx(model, "out/model.onnx")              # uint8 NHWC "image" -> float32 "logits", normalisation inside
    >>> import onnxruntime as ort
    >>> ort.InferenceSession("out/model.onnx").run(["logits"], {"image": batch_uint8_nhwc})[0]
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxvision import files
from flaxvision.errors import FlaxvisionError
from flaxvision.ship import program

EXTRA = "pip install 'flaxvision[onnx]'"
# What `check=True` accepts: max |onnxruntime - JAX| <= TOLERANCE * max(1, max |JAX logits|) (float32 both; the
# runtimes sum in different orders). Measured at the registry's real sizes (random weights): ViT-Ti/16 1.2e-6,
# ViT-B/16 3.6e-6, EVA-02-Ti 6.6e-7, ConvNeXt-T 1.1e-6, ResNet-50 1.2e-4 on logits up to 264 (4e-7 relative).
TOLERANCE = 1e-4
CHECK_BATCH = 2
BATCH_DIM = "batch"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
# A protobuf message cannot exceed 2 GiB, and jax2onnx returns one proto holding every weight.
MAX_WEIGHT_BYTES = 2**31 - 2**26
_LOGGERS = ("onnx_ir", "jax2onnx", "onnx", "onnxscript")
_MISSING = re.compile(r"No plugins registered for primitive '([^']+)'")
# jax2onnx plugin trees a flaxvision program never needs (see `_load_plugins`).
_SKIPPED_PLUGINS = ("equinox", "examples")


def require() -> tuple[Any, Any]:
    """jax2onnx and onnxruntime, or one FlaxvisionError line naming the extra that installs them."""
    try:
        import jax2onnx
        import onnxruntime
    except ImportError as err:
        raise FlaxvisionError(f"ONNX export needs {err.name}, which is not installed: {EXTRA}") from None
    return jax2onnx, onnxruntime


@contextlib.contextmanager
def quiet(debug: bool = False) -> Iterator[None]:
    """jax2onnx and onnx_ir log a WARNING line per untyped shape constant (dozens per model): hide them, and
    anything below ERROR from those libraries, unless `debug`. Also the DeprecationWarnings jax2onnx's plugins
    trigger in Flax (`Variable.value`): they concern jax2onnx's code, not the user's."""
    if debug:
        yield
        return
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _load_plugins() -> None:
    """Register jax2onnx's plugins for JAX and Flax, leaving out its Equinox plugins and its examples.

    jax2onnx imports every module under jax2onnx/plugins on its first conversion; the Equinox ones build and
    compile example modules at import time, 25 of the 33 s that first call takes on two cores. flaxvision programs
    are JAX and Flax NNX only, so we import the other plugin trees with jax2onnx's own importer and mark discovery
    done. Written by hand because jax2onnx has no option for it; if its internals change, its own full discovery
    runs instead (slow, still correct).
    """
    from jax2onnx.plugins import plugin_system as ps

    import_tree = getattr(ps, "_import_tree", None)
    if getattr(ps, "_already_imported_plugins", None) is not False or import_tree is None:
        return
    root = Path(ps.__file__).parent
    for py in sorted(root.glob("*.py")):
        if py.stem not in ("__init__", "plugin_system"):
            importlib.import_module(f"{ps.__package__}.{py.stem}")
    for sub in sorted(root.iterdir()):
        if sub.is_dir() and (sub / "__init__.py").exists() and sub.name not in _SKIPPED_PLUGINS:
            import_tree(sub, f"{ps.__package__}.{sub.name}")
    ps._already_imported_plugins = True


def convert(fn: Callable[[jax.Array], jax.Array], spec: program.ProgramSpec, *, family: str,
            debug: bool = False) -> Any:
    """`fn` (a program of `spec`) as an `onnx.ModelProto`: input `spec.input_name` with a symbolic batch dimension,
    output "logits". A JAX primitive jax2onnx has no conversion for is one FlaxvisionError naming it."""
    jax2onnx, _ = require()
    arg = jax.ShapeDtypeStruct(spec.shape(BATCH_DIM), spec.dtype)
    try:
        # jax2onnx's Flax plugins re-trace layers with NumPy-style broadcasting ((B, H, W, C) + (C,)), which
        # jax_numpy_rank_promotion="raise" (our tests' setting) would refuse; flaxvision's own code is explicit.
        with quiet(debug), jax.numpy_rank_promotion("allow"):
            _load_plugins()
            # prefer_native: LayerNorm as ONNX LayerNormalization (opset 17+), one kernel in onnxruntime, instead
            # of jax2onnx's default explicit graph (13 nodes per norm, its variance in float64); as close to JAX.
            proto = jax2onnx.to_onnx(fn, [arg], model_name=f"flaxvision_{family}", input_names=[spec.input_name],
                                     output_names=[program.OUTPUT_NAME], normalization_mode="prefer_native")
    except NotImplementedError as err:
        found = _MISSING.search(str(err))
        what = f"the JAX primitive {found.group(1)!r}" if found else f"a JAX operation ({err})"
        raise FlaxvisionError(f"ONNX export of a {family} model: jax2onnx cannot convert {what}; use --format "
                              "stablehlo (jax.export), which runs every JAX operation") from None  # fmt: skip
    # jax2onnx annotates some NCHW convolution outputs with their NHWC shapes, which onnxruntime warns about
    # ("Error merging shape info") and overrides; the annotations are optional, and runtimes infer their own.
    del proto.graph.value_info[:]
    return proto


def add_metadata(proto: Any, meta: dict[str, Any]) -> None:
    """The program's metadata as metadata_props: "flaxvision" (all of it), "labels" and "preprocessing" (JSON)."""
    props = {"flaxvision": json.dumps(meta), "labels": json.dumps(meta["labels"]),
             "preprocessing": json.dumps(meta["preprocessing"])}  # fmt: skip
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def check_input(spec: program.ProgramSpec, batch: int = CHECK_BATCH, seed: int = 0) -> np.ndarray:
    """A random batch a program of `spec` takes: uint8 pixels, or float values like normalised ones."""
    rng = np.random.default_rng(seed)
    if spec.input == "uint8":
        return rng.integers(0, 256, spec.shape(batch), dtype=np.uint8)
    return rng.standard_normal(spec.shape(batch)).astype(np.float32)


def compare(model_bytes: bytes, fn: Callable[[jax.Array], jax.Array], spec: program.ProgramSpec, *,
            family: str, batch: int = CHECK_BATCH) -> dict[str, float]:
    """max |onnxruntime - JAX| ("max_abs_diff") and max |JAX logits| ("max_abs_logit") on a random batch; a
    difference above the tolerance is a FlaxvisionError (nothing is written)."""
    _, ort = require()
    x = check_input(spec, batch)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    got = session.run([program.OUTPUT_NAME], {spec.input_name: x})[0]
    want = np.asarray(jax.jit(fn)(x))
    if got.shape != want.shape:
        raise FlaxvisionError(f"ONNX export of a {family} model: onnxruntime gave logits of shape {got.shape}, JAX "
                              f"{want.shape}; nothing was written (a jax2onnx conversion bug: try --format stablehlo)")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    bound = TOLERANCE * max(1.0, scale)
    if not diff <= bound:  # NaN fails too
        raise FlaxvisionError(f"ONNX export of a {family} model: onnxruntime's logits differ from JAX's by {diff:.3g} "
                              f"(> {bound:.3g}) on a random batch; nothing was written (a jax2onnx conversion bug: "
                              "try --format stablehlo)")  # fmt: skip
    return {"max_abs_diff": diff, "max_abs_logit": scale}


def build(model: Any, *, input: str = "uint8", input_size: tuple[int, int] | None = None,
          source: str | None = None, check: bool = True, debug: bool = False) -> tuple[bytes, dict[str, Any]]:
    """The serialized ONNX model of `model`'s program and its metadata (see `to_onnx`), written nowhere."""
    program.check_input(input, input_size)
    require()
    family = model.family
    weight_bytes = 4 * model.config.param_count()
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise FlaxvisionError(f"ONNX export of a {family} model: {weight_bytes / 2**30:.1f} GiB of float32 weights "
                              "exceed protobuf's 2 GiB limit of one ONNX file; use --format stablehlo")  # fmt: skip
    fn, spec = program.inference_function(model, input, input_size)
    proto = convert(fn, spec, family=family, debug=debug)
    meta = program.metadata(model, spec, format="onnx", source=source)
    add_metadata(proto, meta)
    data = proto.SerializeToString()
    if check:
        meta["onnx_check"] = {**compare(data, fn, spec, family=family), "batch": CHECK_BATCH,
                              "tolerance": f"{TOLERANCE} x max(1, max_abs_logit)"}  # fmt: skip
    return data, meta


def to_onnx(model: Any, path: str | Path, *, input: str = "uint8", input_size: tuple[int, int] | None = None,
            source: str | None = None, check: bool = True, debug: bool = False) -> Path:
    """Write `model` as an ONNX model at `path` (atomically) and return the path.

    input: "uint8" (NHWC pixels named "image", normalisation inside) or "float" (NCHW normalised "pixel_values");
    input_size (uint8 only): the program resizes and centre-crops HEIGHTxWIDTH images itself. The batch dimension
    is free. check: run onnxruntime and JAX on a random batch first; a mismatch is an error and nothing is written.
    debug: let jax2onnx's warnings through.
    """
    data, _ = build(model, input=input, input_size=input_size, source=source, check=check, debug=debug)
    return files.write_atomic(Path(path), data)


def to_onnx_dir(model: Any, out_dir: str | Path, **kw: Any) -> Path:
    """`to_onnx` into `out_dir`/model.onnx, with the same metadata as `out_dir`/metadata.json (for readers without
    onnx; it also records the check's measured difference). Returns the model's path."""
    data, meta = build(model, **kw)
    out = files.make_dirs(out_dir)
    path = files.write_atomic(out / MODEL_FILE, data)
    files.write_json(out / METADATA_FILE, meta)
    return path
