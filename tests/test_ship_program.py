"""Programs that run without flaxvision: ONNX through jax2onnx checked with onnxruntime, StableHLO through
jax.export called in a process where flaxvision cannot be imported, and `flaxvision export --format onnx|stablehlo`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flaxvision.errors import FlaxvisionError
from flaxvision.models.registry import build_model, model_config
from flaxvision.preprocessing import Preprocessing
from flaxvision.ship import onnx_export, program, stablehlo
from tests.helpers import CLASS_NAMES, TINY_VIT, cli_env, error_lines, run_cli, snapshot

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

TOL = 1e-4  # the acceptance bound for float32 logits
# timm's ImageNet eval geometry (shorter side to img_size / 0.875, centre crop, bicubic): the baked resize's hard case.
PREP = Preprocessing(img_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=0.875, resize_mode="shortest",
                     interpolation="bicubic")  # fmt: skip

CONFIGS = {
    "vit": model_config("vit_tiny_patch16_224", num_classes=4, **TINY_VIT),
    "resnet": model_config("resnet18", num_classes=4, img_size=32, stage_depths=(1, 1, 1, 1),
                           stage_widths=(8, 16, 16, 16)),  # fmt: skip
    "cnn": model_config("cnn", num_classes=4, features=(8, 16), hidden=32),
}


@pytest.fixture(scope="module")
def models():
    return {kind: build_model(config, seed=3, label_names=CLASS_NAMES,
                              preprocessing=PREP if kind == "vit" else None)
            for kind, config in CONFIGS.items()}  # fmt: skip


@pytest.fixture(scope="module")
def onnx_files(models, tmp_path_factory):
    """One uint8 ONNX export per model (checked by to_onnx against JAX on the way)."""
    out = tmp_path_factory.mktemp("onnx")
    return {kind: onnx_export.to_onnx(model, out / f"{kind}.onnx", source=f"test:{kind}") for kind, model in models.items()}


def reference_logits(model, images_uint8: np.ndarray) -> np.ndarray:
    """flaxvision's logits for uint8 NHWC images: the model itself on normalised input (not the program)."""
    prep = model.preprocessing
    x = (images_uint8.astype(np.float32) / 255 - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.asarray(_forward(model, jnp.asarray(x)))


@nnx.jit
def _forward(model, x):  # compiled once per model and shape (op-by-op eager dispatch is far slower on CPU)
    return model(x)


def pixels(model, batch: int, seed: int) -> np.ndarray:
    h, w, c = model.input_shape
    return np.random.default_rng(seed).integers(0, 256, (batch, h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_onnxruntime_matches_flaxvision_at_two_batch_sizes(kind, models, onnx_files):
    model = models[kind]
    session = ort.InferenceSession(str(onnx_files[kind]), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[0]) == ("image", "tensor(uint8)", "batch")
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 3):
        x = pixels(model, batch, seed=batch)
        got = session.run(["logits"], {"image": x})[0]
        want = reference_logits(model, x)
        assert got.shape == (batch, 4) and got.dtype == np.float32
        assert np.abs(got - want).max() <= TOL, (kind, batch, np.abs(got - want).max())
        assert np.abs(want).max() > 10 * TOL  # the comparison is not between two near-zero outputs


def test_metadata_props_hold_labels_and_preprocessing(models, onnx_files):
    proto = onnx.load(str(onnx_files["vit"]))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["labels"]) == CLASS_NAMES
    assert json.loads(props["preprocessing"]) == json.loads(json.dumps(PREP.to_dict()))
    meta = json.loads(props["flaxvision"])
    assert meta["format"] == "onnx" and meta["source"] == "test:vit" and meta["labels"] == CLASS_NAMES
    assert meta["input"] == {"name": "image", "dtype": "uint8", "layout": "NHWC", "shape": [None, 16, 16, 3],
                             "baked": ["normalize"]}  # fmt: skip
    assert meta["output"]["name"] == "logits" and meta["model"]["num_classes"] == 4
    assert not proto.graph.value_info  # jax2onnx's stale NHWC shape annotations are dropped


def test_float_nchw_input(models, tmp_path):
    model = models["vit"]
    path = onnx_export.to_onnx(model, tmp_path / "float.onnx", input="float")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape) == ("pixel_values", "tensor(float)", ["batch", 3, 16, 16])
    x_nhwc = np.random.default_rng(0).standard_normal((3, 16, 16, 3)).astype(np.float32)
    got = session.run(["logits"], {"pixel_values": np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))})[0]
    assert np.abs(got - np.asarray(_forward(model, jnp.asarray(x_nhwc)))).max() <= TOL
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["flaxvision"])["input"]["baked"] == []


def test_a_primitive_jax2onnx_lacks_is_one_error_naming_it():
    def min_pool(x):  # lax.reduce_window with min: jax2onnx 0.17 has no plugin for reduce_window_min
        return jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, 2, 2, 1), (1, 2, 2, 1), "VALID").mean(axis=(1, 2))

    spec = program.ProgramSpec(input="float", height=4, width=4, channels=3, baked=())
    with pytest.raises(FlaxvisionError, match=r"'reduce_window_min'.*--format stablehlo") as err:
        onnx_export.convert(lambda x: min_pool(jnp.transpose(x, (0, 2, 3, 1))), spec, family="MinPoolNet")
    assert "MinPoolNet" in str(err.value) and "\n" not in str(err.value)


def test_an_onnx_model_that_disagrees_with_jax_is_refused(models, onnx_files):
    """The check to_onnx runs before writing: another model's function against this file is far off."""
    fn, spec = program.inference_function(models["vit"])
    other = build_model(CONFIGS["vit"], seed=4, label_names=CLASS_NAMES, preprocessing=PREP)
    good = onnx_export.compare(onnx_files["vit"].read_bytes(), fn, spec, family="ViT")
    assert good["max_abs_diff"] <= TOL < good["max_abs_logit"]
    other_fn, _ = program.inference_function(other)
    with pytest.raises(FlaxvisionError, match="differ from JAX's.*nothing was written"):
        onnx_export.compare(onnx_files["vit"].read_bytes(), other_fn, spec, family="ViT")


def test_float32_model_computes_a_bf16_model_in_float32(models):
    import dataclasses

    model = models["vit"]
    bf16 = build_model(dataclasses.replace(CONFIGS["vit"], dtype="bfloat16"), seed=3, label_names=CLASS_NAMES,
                       preprocessing=PREP)  # fmt: skip
    copy = program.float32_model(bf16)
    assert copy.config.dtype == "float32" and bf16.config.dtype == "bfloat16"
    assert copy.label_names == bf16.label_names and copy.preprocessing == bf16.preprocessing
    x = pixels(model, 2, seed=5)
    fn, _ = program.inference_function(bf16)
    got, want = np.asarray(jax.jit(fn)(x)), reference_logits(model, x)  # same seed: the same float32 weights
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(reference_logits(bf16, x) - want).max() > 1e-4  # bf16 compute really differs (7e-4 here)


def test_baked_resize_gives_predict_s_top1_on_a_larger_image(models):
    """--input-size: the program resizes + crops 60x80 images itself (antialiased JAX resampling) vs predict's
    PIL resize; measured on noise (the worst case): <= 0.8/255 per pixel, logits within 5e-3."""
    from flaxvision.data.transforms import decode_eval

    model = models["vit"]
    rng = np.random.default_rng(0)
    images, predicted = [], []
    for _ in range(3):
        image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        images.append(image)
        predicted.append(decode_eval(buf.getvalue(), PREP))
    fn, spec = program.inference_function(model, "uint8", (60, 80))
    assert (spec.height, spec.width, spec.baked) == (60, 80, ("resize", "crop", "normalize"))
    got, want = np.asarray(jax.jit(fn)(np.stack(images))), reference_logits(model, np.stack(predicted))
    assert np.abs(got - want).max() <= 5e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()


# ---- StableHLO and the CLI --------------------------------------------------------------------------------------

LOADER_CHECK = """
import sys
sys.modules["flaxvision"] = None  # `import flaxvision` fails from here on
import json, numpy as np, jax
try:
    import flaxvision
    raise SystemExit("flaxvision importable")
except ImportError:
    pass
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
data = np.load(sys.argv[2])
print(json.dumps({k: np.asarray(exported.call(data[k])).tolist() for k in data.files}))
"""


@pytest.fixture(scope="module")
def model_dir(models, tmp_path_factory):
    from flaxvision.weights import save_pretrained

    return save_pretrained(models["vit"], tmp_path_factory.mktemp("vit-model"), format="flaxvision")


def test_stablehlo_runs_in_a_process_without_flaxvision(models, model_dir, tmp_path, capsys):
    """`export --format stablehlo`, then one fresh process where `import flaxvision` fails: the program at two
    batch sizes, and the ten-line loader of stablehlo's docstring, as written, on a PNG (predict's label)."""
    from flaxvision.data.transforms import decode_eval

    out = tmp_path / "out"
    code, stdout, err = run_cli(["export", model_dir, "--format", "stablehlo", "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.jax_export"]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["stablehlo"]["platforms"] == ["cpu", "cuda", "tpu"] and meta["labels"] == CLASS_NAMES
    assert meta["stablehlo"]["jax_version"] == jax.__version__ and meta["stablehlo"]["calling_convention_version"] >= 9
    model = models["vit"]
    inputs = {"b1": pixels(model, 1, seed=7), "b3": pixels(model, 3, seed=8)}
    np.savez(str(tmp_path / "inputs.npz"), b1=inputs["b1"], b3=inputs["b3"])
    image = np.random.default_rng(1).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "cat.jpg", "PNG")  # PIL opens by content, not by extension
    doc = (stablehlo.__doc__ or "").splitlines()
    start = doc.index("    import json, numpy as np, jax")
    loader = textwrap.dedent("\n".join(doc[start : start + 10]))
    assert len(loader.splitlines()) == 10 and "flaxvision" not in loader
    (tmp_path / "load.py").write_text(LOADER_CHECK + loader + "\n")
    env = {k: v for k, v in cli_env().items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "load.py", "out/model.jax_export", "inputs.npz"], capture_output=True,
                          text=True, env=env, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    *_, logits_line, label = done.stdout.strip().splitlines()
    got = json.loads(logits_line)
    for key, x in inputs.items():
        assert np.abs(np.asarray(got[key], np.float32) - reference_logits(model, x)).max() <= TOL
    want = reference_logits(model, decode_eval(tmp_path / "cat.jpg", PREP)[None])
    assert label == CLASS_NAMES[int(want[0].argmax())]


def test_cli_writes_an_onnx_model_and_its_metadata(model_dir, models, tmp_path, capsys):
    out = tmp_path / "onnx"
    code, stdout, err = run_cli(["export", model_dir, "--format", "onnx", "--out", out], capsys)
    assert code == 0 and "WARNING" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.onnx"]
    meta = json.loads((out / "metadata.json").read_text())
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert {k: v for k, v in meta.items() if k != "onnx_check"} == json.loads(props["flaxvision"])
    assert meta["onnx_check"]["max_abs_diff"] <= TOL and meta["source"] == str(model_dir)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = pixels(models["vit"], 2, seed=9)
    assert np.abs(session.run(["logits"], {"image": x})[0] - reference_logits(models["vit"], x)).max() <= TOL


@pytest.mark.parametrize("args, message", [
    (["--format", "timm", "--input", "uint8"], "--input applies to --format onnx or stablehlo"),
    (["--format", "npz", "--input-size", "32x32"], "--input-size applies to --format onnx or stablehlo"),
    (["--format", "onnx", "--platforms", "cpu"], "--platforms applies to --format stablehlo"),
    (["--format", "stablehlo", "--platforms", "cpu,gpu"], "--platforms cpu,gpu: give distinct names"),
    (["--format", "stablehlo", "--platforms", "cpu,cpu"], "--platforms cpu,cpu: give distinct names"),
    (["--format", "onnx", "--input", "float", "--input-size", "64x64"], "it needs --input uint8"),
    (["--format", "onnx", "--input-size", "64by64"], "--input-size '64by64': give HEIGHTxWIDTH"),
    (["--format", "stablehlo", "--input-size", "0x64"], "--input-size must be HEIGHTxWIDTH with sides in 1..8192"),
])  # fmt: skip
def test_bad_program_flags_are_one_line_and_write_nothing(args, message, model_dir, tmp_path, capsys):
    before = snapshot(tmp_path)
    code, stdout, err = run_cli(["export", model_dir, *args, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and message in err, err
    assert snapshot(tmp_path) == before


def test_missing_jax2onnx_names_the_extra(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if not installed
    code, stdout, err = run_cli(["export", model_dir, "--format", "onnx", "--out", tmp_path / "out"], capsys)
    assert code == 2 and error_lines(err) == [
        "flaxvision: error: ONNX export needs jax2onnx, which is not installed: pip install 'flaxvision[onnx]'"]
    assert not (tmp_path / "out").exists()
