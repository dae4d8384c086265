"""A model as a pure function of an image batch: what `export --format onnx|stablehlo` writes and `serve` runs.

Two input conventions (`INPUTS`):
  "uint8": NHWC uint8 pixels, as an image decoder gives them; the normalisation ((x / 255 - mean) / std) is inside
           the program, and with `input_size` so are the eval resize and centre crop of the model's preprocessing.
  "float": NCHW float32, already normalised: transformers' `pixel_values`, what ONNX consumers usually feed.
The batch dimension is free (symbolic); the output is float32 logits (batch, num_classes). Programs compute in
float32 whatever the model trained in: an exported program should give the logits `predict` computes from.

`metadata(...)` is the JSON that travels with a program (the ONNX model's metadata_props, StableHLO's
metadata.json): labels in class order, the model's preprocessing, what is baked in, and the input/output names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flaxvision import __version__
from flaxvision.errors import FlaxvisionError

INPUTS = ("uint8", "float")
INPUT_NAMES = {"uint8": "image", "float": "pixel_values"}
OUTPUT_NAME = "logits"


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """The input of a program.

    Attributes:
      input: "uint8" or "float" (see the module docstring).
      height, width: the spatial size the program takes: the model's img_size, or `input_size` when the eval
        resize is baked in.
      channels: the model's input channels.
      baked: what the program does before the model: () for float input, ("normalize",) or
        ("resize", "crop", "normalize") for uint8.
    """

    input: str
    height: int
    width: int
    channels: int
    baked: tuple[str, ...]

    @property
    def input_name(self) -> str:
        return INPUT_NAMES[self.input]

    def shape(self, batch: Any) -> tuple[Any, ...]:
        """The input shape for a batch size (an int, or a symbolic/None dimension)."""
        if self.input == "uint8":
            return (batch, self.height, self.width, self.channels)
        return (batch, self.channels, self.height, self.width)

    @property
    def dtype(self) -> Any:
        return jnp.uint8 if self.input == "uint8" else jnp.float32


def check_input(input: str, input_size: tuple[int, int] | None) -> None:
    """Refuse, before any model is loaded, an unknown input kind or a resize on float input."""
    if input not in INPUTS:
        raise FlaxvisionError(f"unknown program input {input!r}; choose one of {', '.join(INPUTS)}")
    if input_size is not None:
        if input != "uint8":
            raise FlaxvisionError("--input-size bakes the eval resize into a uint8 program; it needs --input uint8")
        if len(input_size) != 2 or min(input_size) < 1 or max(input_size) > 8192:
            raise FlaxvisionError(f"--input-size must be HEIGHTxWIDTH with sides in 1..8192, got {input_size}")


def float32_model(model: Any) -> Any:
    """The model computing in float32: programs are compared with float32 references, and bf16 kernels are not
    portable across ONNX runtimes. A float32 model is returned as it is; a bf16 one is rebuilt with
    config.dtype = "float32" around the same weights (its parameters are float32 already)."""
    if getattr(model.config, "dtype", "float32") == "float32":
        return model
    from flax import nnx

    from flaxvision.models.registry import abstract_model

    config = dataclasses.replace(model.config, dtype="float32")
    graphdef, _ = nnx.split(abstract_model(config))
    copy = nnx.merge(graphdef, nnx.state(model))
    copy.preprocessing, copy.label_names = model.preprocessing, model.label_names
    return copy


def inference_function(model: Any, input: str = "uint8", input_size: tuple[int, int] | None = None
                       ) -> tuple[Callable[[jax.Array], jax.Array], ProgramSpec]:
    """`fn(images) -> logits` for `model` (in eval mode, weights as constants), and its input spec.

    `input_size` (uint8 only): the program takes HEIGHTxWIDTH images and applies the model's eval resize + centre
    crop itself (jax.image.scale_and_translate, antialiased; close to, not bit-equal with, PIL's resampling).
    """
    from flax import nnx

    check_input(input, input_size)
    model = float32_model(model)
    model.eval()
    prep = model.preprocessing
    h, w, c = model.input_shape
    graphdef, state = nnx.split(model)
    # (1, 1, 1, C): explicit ranks, so the program also traces under jax_numpy_rank_promotion="raise"
    mean = jnp.asarray(prep.mean, jnp.float32).reshape(1, 1, 1, -1)
    inv_std = 1.0 / jnp.asarray(prep.std, jnp.float32).reshape(1, 1, 1, -1)
    if input_size is not None:
        baked: tuple[str, ...] = ("resize", "crop", "normalize")
        in_h, in_w = input_size
    else:
        baked = ("normalize",) if input == "uint8" else ()
        in_h, in_w = h, w
    spec = ProgramSpec(input=input, height=in_h, width=in_w, channels=c, baked=baked)

    def fn(images: jax.Array) -> jax.Array:
        if input == "uint8":
            x = images.astype(jnp.float32) * (1.0 / 255.0)
            if input_size is not None:
                x = resize_crop(x, prep, (h, w))
            x = (x - mean) * inv_std
        else:
            x = jnp.transpose(images.astype(jnp.float32), (0, 2, 3, 1))
        return nnx.merge(graphdef, state)(x).astype(jnp.float32)

    return fn, spec


def resize_crop(x: jax.Array, prep: Any, out: tuple[int, int]) -> jax.Array:
    """The eval geometry of `prep` (flaxvision.data.transforms.eval_box: the region kept, then resized to `out`)
    on a float NHWC batch, as one scale-and-translate per axis."""
    from flaxvision.data.transforms import eval_box

    in_h, in_w = x.shape[1], x.shape[2]
    left, top, right, bottom = eval_box(in_w, in_h, prep)
    scale = jnp.asarray([out[0] / (bottom - top), out[1] / (right - left)], jnp.float32)
    translate = -scale * jnp.asarray([top, left], jnp.float32)
    method = {"nearest": "nearest", "bilinear": "linear", "bicubic": "cubic", "lanczos": "lanczos3"}[prep.interpolation]
    return jax.image.scale_and_translate(x, (x.shape[0], *out, x.shape[3]), (1, 2), scale, translate, method=method,
                                         antialias=True)


def metadata(model: Any, spec: ProgramSpec, *, format: str, source: str | None = None) -> dict[str, Any]:
    """What travels with an exported program: enough to feed it and to name its outputs without flaxvision."""
    return {
        "format": format,
        "flaxvision_version": __version__,
        "source": source,
        "model": {"family": model.family, "num_classes": model.config.num_classes,
                  "img_size": model.config.img_size, "in_chans": model.config.in_chans},
        "input": {"name": spec.input_name, "dtype": "uint8" if spec.input == "uint8" else "float32",
                  "layout": "NHWC" if spec.input == "uint8" else "NCHW",
                  "shape": [None, *spec.shape(None)[1:]], "baked": list(spec.baked)},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, model.config.num_classes],
                   "meaning": "logits; softmax gives the class probabilities"},
        "labels": model.class_names(),
        "preprocessing": model.preprocessing.to_dict(),
    }
