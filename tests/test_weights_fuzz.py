"""Fuzzing what reads weights: the only outcomes of load_pretrained are a model or exactly one FlaxvisionError.

Starting from valid tiny checkpoints written by the reference libraries (a transformers ViT via save_pretrained,
1 layer of width 32, and flaxvision's own format of it; a timm ViT via save_for_hf, and the .npz flaxvision writes
of it), hypothesis mutates the
config.json values (types, sizes, deletions), the safetensors header (its length, dtypes, shapes, offsets, bytes),
the tensors (dtype, shape, NaN/Inf, deletions) and the .npz archive. Any other exception fails the test, and so
does an error of more than one line. Derandomized (the same examples on every run) with no example database;
the @examples are inputs that failed before the loaders were hardened.
"""

import json
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import transformers
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load, save
from timm.models._hub import save_for_hf

import flaxvision
from flaxvision import FlaxvisionError
from flaxvision.models.base import Classifier

# No per-example deadline: the suite shares two cores, and a slow example under load is not a bug (how long a bad
# file takes to refuse is measured by hand and stated in the note, not timed in a test).
SETTINGS = settings(max_examples=50, derandomize=True, database=None, deadline=None, phases=tuple(Phase)[:-1],
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
DELETE = "<delete>"


# name -> {file name: bytes} of the valid checkpoints; filled once per module (not a test argument, so that a
# failing example prints only the changes).
ORIGINALS: dict[str, dict[str, bytes]] = {}


@pytest.fixture(scope="module", autouse=True)
def originals(tmp_path_factory) -> None:
    """The valid checkpoints, each loaded once here (so they are valid)."""
    root = tmp_path_factory.mktemp("fuzz")
    sizes: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=8, num_labels=3)  # fmt: skip
    hf = transformers.ViTConfig(**sizes)
    transformers.ViTForImageClassification(hf).eval().save_pretrained(root / "hf")
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=48, img_size=32, num_classes=3)
    save_for_hf(timm_model.eval(), str(root / "timm"), safe_serialization=True)
    flaxvision.save_pretrained(flaxvision.load_pretrained(root / "timm"), root / "npz" / "model.npz", format="npz")
    flaxvision.save_pretrained(flaxvision.load_pretrained(root / "hf"), root / "native")
    for name in ("hf", "timm", "npz", "native"):
        assert isinstance(flaxvision.load_pretrained(root / name), Classifier)
        ORIGINALS[name] = {p.name: p.read_bytes() for p in (root / name).iterdir()}


def outcome(files: dict[str, bytes], source: str | None = None) -> str:
    """Write the files to a fresh directory and load it: "loaded", or "error" for exactly one FlaxvisionError."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            model = flaxvision.load_pretrained(Path(tmp) / source if source else tmp)
        except FlaxvisionError as err:
            assert "\n" not in str(err), str(err)
            event("error")
            return "error"
    assert isinstance(model, Classifier)
    event("loaded")
    return "loaded"


# ---- config.json values -------------------------------------------------------------------------------------------

JSON_VALUES = st.one_of(
    st.just(DELETE), st.none(), st.booleans(), st.sampled_from([0, -1, 1, 2, 3, 8, 300, 10**9, 2**63]), st.integers(),
    st.floats(), st.text(max_size=4), st.sampled_from(["gelu", "vit", "timm", "token", "avg", "map", "bicubic", "768"]),
    st.lists(st.integers(-2, 40), max_size=3), st.lists(st.floats(), max_size=3),
    st.dictionaries(st.sampled_from(["0", "1", "2", "x"]), st.one_of(st.text(max_size=3), st.integers()), max_size=3),
)  # fmt: skip
CONFIG_KEYS = [
    ("hf", key) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                            "image_size", "patch_size", "num_channels", "layer_norm_eps", "qkv_bias", "hidden_act",
                            "id2label", "label2id", "model_type", "num_labels", "hidden_dropout_prob")
] + [
    ("timm", key) for key in ("architecture", "num_classes", "global_pool", "label_names", "model_args",
                              "model_args.depth", "model_args.num_heads", "model_args.embed_dim", "model_args.act_layer",
                              "model_args.img_size", "model_args.class_token", "model_args.mlp_ratio", "pretrained_cfg",
                              "pretrained_cfg.mean", "pretrained_cfg.crop_pct", "pretrained_cfg.interpolation")
] + [
    ("native", key) for key in ("config_class", "config", "config.width", "config.depth", "config.num_heads",
                                "config.qkv_bias", "config.global_pool", "config.fc_norm", "config.layer_norm_eps",
                                "config.remat", "preprocessing", "preprocessing.mean", "preprocessing.img_size",
                                "label_names")
]  # fmt: skip


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, key = path.split(".")
    for parent in parents:
        if not isinstance(config.get(parent), dict):
            config[parent] = {}
        config = config[parent]
    if value == DELETE:
        config.pop(key, None)
    else:
        config[key] = value


@settings(SETTINGS, max_examples=100)  # three formats' config files
@given(changes=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), JSON_VALUES), min_size=1, max_size=3))
@example(changes=[(("hf", "hidden_act"), ["gelu"])])  # was TypeError: unhashable type: 'list'
@example(changes=[(("hf", "layer_norm_eps"), "x")])  # was ValueError: could not convert string to float
@example(changes=[(("hf", "hidden_size"), "768")])  # was TypeError: not all arguments converted
@example(changes=[(("hf", "num_attention_heads"), 0)])  # was ZeroDivisionError
@example(changes=[(("hf", "hidden_size"), 10**9)])  # was ValueError: array is too big
@example(changes=[(("hf", "num_hidden_layers"), 1.5)])  # was TypeError: 'float' object cannot be interpreted as an integer
@example(changes=[(("hf", "num_hidden_layers"), True)])  # was loaded as depth 1
@example(changes=[(("hf", "id2label"), "abc")])  # was loaded with 3 classes from the string's length
@example(changes=[(("timm", "model_args.act_layer"), ["gelu"])])  # was TypeError: unhashable type: 'list'
@example(changes=[(("native", "config_class"), ["ViTConfig"])])  # was TypeError: unhashable type: 'list'
@example(changes=[(("native", "config"), ["width"])])  # was AttributeError: 'list' object has no attribute 'items'
@example(changes=[(("native", "preprocessing"), {"mean": [0.5]})])  # was TypeError: missing img_size
@example(changes=[(("native", "label_names"), "abc")])  # was loaded with the labels 'a', 'b', 'c'
def test_config_json_values(changes):
    files = {name: dict(data) for name, data in ORIGINALS.items()}
    configs = {name: json.loads(files[name]["config.json"]) for name in ("hf", "timm", "native")}
    for (target, path), value in changes:
        set_path(configs[target], path, value)
    target = changes[0][0][0]
    files[target]["config.json"] = json.dumps(configs[target]).encode()
    result = outcome(files[target])
    if all(value == DELETE and path in ("label2id", "hidden_dropout_prob") for (_, path), value in changes):
        assert result == "loaded"  # keys with defaults: deleting them changes nothing


# ---- the safetensors header and bytes ----------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "Q7", "", "F4"]
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "C64": 8}
HEADER_CHANGES = st.one_of(
    st.tuples(st.just("length"), st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("dtype"), st.integers(0, 100), st.sampled_from(DTYPES)),
    st.tuples(st.just("retype"), st.integers(0, 100), st.sampled_from(DTYPES)),  # dtype and a shape of its bytes
    st.tuples(st.just("shape"), st.integers(0, 100), st.lists(st.integers(-1, 2**40), max_size=4)),
    st.tuples(st.just("data_offsets"), st.integers(0, 100), st.lists(st.integers(-1, 2**40), min_size=0, max_size=3)),
    st.tuples(st.just("metadata"), st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()))),
)


def change_header(data: bytes, change: tuple) -> bytes:
    kind = change[0]
    if kind == "length":
        return struct.pack("<Q", change[1]) + data[8:]
    if kind == "truncate":
        return data[: int(len(data) * change[1])]
    if kind == "byte":
        position = change[1] % max(len(data), 1)
        return data[:position] + bytes([change[2]]) + data[position + 1 :]
    try:  # the header's fields, when an earlier change left it readable
        size = struct.unpack("<Q", data[:8])[0]
        header, body = json.loads(data[8 : 8 + size]), data[8 + size :]
        names = sorted(k for k in header if k != "__metadata__")
    except (struct.error, ValueError, TypeError, AttributeError):
        return data
    if kind == "metadata":
        header["__metadata__"] = change[1]
    elif names and kind == "retype":
        entry = header[names[change[1] % len(names)]]
        start, end = entry["data_offsets"]
        itemsize = DTYPE_SIZES.get(change[2], 1)
        entry["dtype"], entry["shape"] = change[2], [(end - start) // itemsize]
    elif names:
        header[names[change[1] % len(names)]][kind] = change[2]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@SETTINGS
@given(target=st.sampled_from(["hf", "timm"]), changes=st.lists(HEADER_CHANGES, min_size=1, max_size=2))
@example(target="hf", changes=[("retype", 9, "F8_E4M3")])  # was AttributeError: numpy has no float8_e4m3fn
def test_safetensors_header(target, changes):
    files = dict(ORIGINALS[target])
    for change in changes:
        files["model.safetensors"] = change_header(files["model.safetensors"], change)
    outcome(files)


# ---- the tensors ------------------------------------------------------------------------------------------------

TENSOR_DTYPES = [np.int8, np.int32, np.int64, np.uint8, np.bool_, np.float16, np.float64, np.complex64]
TENSOR_CHANGES = st.tuples(
    st.integers(0, 1000),
    st.sampled_from(["dtype", "flatten", "drop_axis", "scalar", "add_axis", "nan", "inf", "delete", "extra"]),
    st.sampled_from(TENSOR_DTYPES),
)


def change_tensor(tensors: dict[str, np.ndarray], change: tuple) -> None:
    index, kind, dtype = change
    names = sorted(tensors)
    name = names[index % len(names)]
    value = tensors[name]
    if kind == "dtype":
        tensors[name] = value.astype(dtype)
    elif kind == "flatten":
        tensors[name] = value.reshape(-1)
    elif kind == "drop_axis":
        tensors[name] = value[..., 0] if value.ndim else value
    elif kind == "scalar":
        tensors[name] = np.asarray(value.reshape(-1)[0])
    elif kind == "add_axis":
        tensors[name] = value[None]
    elif kind in ("nan", "inf"):
        tensors[name] = value.copy()
        tensors[name].reshape(-1)[index % value.size] = np.nan if kind == "nan" else np.inf
    elif kind == "delete":
        del tensors[name]
    else:
        tensors[f"{name}.extra"] = np.zeros(3, np.float32)


@SETTINGS
@given(target=st.sampled_from(["hf", "timm"]), changes=st.lists(TENSOR_CHANGES, min_size=1, max_size=2))
@example(target="hf", changes=[(9, "dtype", np.int64)])  # was loaded: the int64 tensor cast to float32
@example(target="hf", changes=[(9, "dtype", np.bool_)])  # was loaded: the bool tensor cast to float32
def test_tensors(target, changes):
    files = dict(ORIGINALS[target])
    tensors = dict(load(files["model.safetensors"]))
    for change in changes:
        change_tensor(tensors, change)
    files["model.safetensors"] = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "pt"})
    result = outcome(files)
    finite_floats = all(v.dtype.kind == "f" and np.isfinite(v).all() for v in tensors.values())
    if not finite_floats and result == "loaded":  # only NaN/Inf, never an integer tensor, may load (with a warning)
        assert all(v.dtype.kind == "f" for v in tensors.values())


# ---- .npz archives ----------------------------------------------------------------------------------------------

NPZ_CHANGES = st.tuples(
    st.integers(0, 1000),
    st.sampled_from(["delete", "dtype", "scalar", "object", "truncate", "byte", "member", "nan", "stacked"]),
    st.sampled_from(TENSOR_DTYPES),
    st.floats(0, 1),
)


def change_npz(data: bytes, change: tuple, tmp: Path) -> bytes:
    index, kind, dtype, fraction = change
    if kind == "truncate":
        return data[: int(len(data) * fraction)]
    if kind == "byte":
        position = index * 97 % len(data)
        return data[:position] + bytes([index % 256]) + data[position + 1 :]
    path = tmp / "in.npz"
    path.write_bytes(data)
    try:  # the arrays, when an earlier change left the archive readable (perhaps with an object array)
        with open(path, "rb") as f:  # our own handle: np.load leaks the one it opens on a corrupt file
            archive = np.load(f, allow_pickle=True)
            arrays: dict[str, Any] = {k: archive[k] for k in archive.files}
    except Exception:
        return data
    if not arrays:
        return data
    name = sorted(arrays)[index % len(arrays)]
    if kind == "delete":
        del arrays[name]
    elif kind == "dtype":
        arrays[name] = arrays[name].astype(dtype)
    elif kind == "scalar":
        arrays[name] = np.asarray(arrays[name].reshape(-1)[0])
    elif kind == "object":
        arrays[name] = np.array([{"evil": 1}], dtype=object)
    elif kind == "nan" and arrays[name].dtype.kind == "f" and arrays[name].size:
        arrays[name] = arrays[name].copy()
        arrays[name].reshape(-1)[0] = np.nan
    elif kind == "stacked":  # big_vision's nn.scan layout, possibly with a 0-d array
        value = arrays.pop(name)
        arrays["Transformer/encoderblock/" + name.split("/")[-1]] = value[0] if index % 2 and value.ndim else np.float32(1)
    np.savez(path, **arrays)
    if kind == "member":
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr("notes.txt", "not an array")
    return path.read_bytes()


@SETTINGS
@given(changes=st.lists(NPZ_CHANGES, min_size=1, max_size=2))
@example(changes=[(0, "truncate", np.int8, 0.0)])  # an empty file
@example(changes=[(3, "stacked", np.int8, 0.0)])  # was TypeError: iteration over a 0-d array
def test_npz_archives(changes):
    data = ORIGINALS["npz"]["model.npz"]
    with tempfile.TemporaryDirectory() as tmp:
        for change in changes:
            data = change_npz(data, change, Path(tmp))
    outcome({"model.npz": data}, "model.npz")

