"""Pretrained weights, bad input: every problem is one FlaxvisionError that says what, which value, what to do.

Also the Hub: offline with nothing cached (a clear error), and a cached repo loading offline, through the real
huggingface_hub cache layout. Nothing is downloaded.
"""

import io
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from typing import Any

import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors.numpy import load_file
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

import flaxvision
from flaxvision import FlaxvisionError


def tiny_timm(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=3, **kwargs).eval()


def numpy_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def tiny_hf(directory, **config) -> transformers.ViTForImageClassification:
    defaults: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)
    merged: dict[str, Any] = defaults | {"num_labels": 3} | config
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**merged)).eval()
    model.save_pretrained(directory)
    return model


# ---- keys and shapes: one error naming both sides -----------------------------------------------------------------


def test_missing_unexpected_and_mismatched_tensors_in_one_error(tmp_path):
    state = numpy_state(tiny_timm())
    del state["blocks.0.mlp.fc2.bias"]
    state["blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
    state["blocks.0.norm1.weight"] = np.ones((10,), np.float32)
    save_numpy(state, tmp_path / "vit.safetensors")
    with pytest.raises(FlaxvisionError) as error:
        flaxvision.load_pretrained(tmp_path / "vit.safetensors")
    message = str(error.value)
    assert message.startswith(f"timm weights '{tmp_path / 'vit.safetensors'}': ")
    assert "missing from the weights (1): blocks.0.mlp.fc2.bias" in message
    assert "unexpected in the weights (1): blocks.0.attn.extra.weight" in message
    assert "shape mismatches, weights vs model (1): blocks.0.norm1.weight (10,) vs (192,)" in message
    assert "nothing was loaded" in message and "\n" not in message


@pytest.mark.parametrize("problem", ["missing", "unexpected"])
def test_a_single_key_problem_is_named(tmp_path, problem):
    tiny_hf(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    if problem == "missing":
        del state["vit.encoder.layer.0.attention.attention.key.weight"]
        expected = "missing from the weights (1): vit.encoder.layer.0.attention.attention.key.weight"
    else:
        state["vit.encoder.layer.0.attention.attention.rel_pos"] = np.zeros(3, np.float32)
        expected = "unexpected in the weights (1): vit.encoder.layer.0.attention.attention.rel_pos"
    save_numpy(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FlaxvisionError, match="transformers weights") as error:
        flaxvision.load_pretrained(tmp_path)
    assert expected in str(error.value)
    assert ("unexpected" in str(error.value)) == (problem == "unexpected")


def test_config_and_weights_that_disagree(tmp_path):
    tiny_hf(tmp_path, num_labels=3)
    config = json.loads((tmp_path / "config.json").read_text())
    config["id2label"] = {str(i): f"c{i}" for i in range(5)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FlaxvisionError, match=r"classifier.bias \(3,\) vs \(5,\), classifier.weight \(3, 32\) vs \(5, 32\)"):
        flaxvision.load_pretrained(tmp_path)


def test_the_name_and_the_options_are_checked(tmp_path):
    tiny_hf(tmp_path)
    wrong_name = r"is not a vit_tiny_patch16_224: .*patch_size 8 \(weights\) vs 16.*width 32 \(weights\) vs 192"
    with pytest.raises(FlaxvisionError, match=wrong_name):
        flaxvision.create_model("vit_tiny_patch16_224", pretrained=tmp_path)
    with pytest.raises(flaxvision.ConfigError, match="in_chans=1 would change the architecture"):
        flaxvision.create_model(None, pretrained=tmp_path, in_chans=1)
    with pytest.raises(flaxvision.ConfigError, match="head_init must be one of zeros, random, got 'ones'"):
        flaxvision.load_pretrained(tmp_path, num_classes=4, head_init="ones")
    with pytest.raises(flaxvision.ConfigError, match="2 label names for a model with num_classes=4"):
        flaxvision.load_pretrained(tmp_path, num_classes=4, label_names=["a", "b"])
    with pytest.raises(FlaxvisionError, match="needs a model name, or pretrained="):
        flaxvision.create_model(None)


# ---- formats and files -------------------------------------------------------------------------------------------


def test_unknown_formats_say_what_is_supported(tmp_path):
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF\r\n")
    unknown = r"unknown weights format 'weights.h5'; flaxvision reads a Hugging Face Hub repo id .*\.npz file"
    with pytest.raises(FlaxvisionError, match=unknown):
        flaxvision.load_pretrained(tmp_path / "weights.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlaxvisionError, match=r"no weights found in '.*empty' \(it holds nothing\); flaxvision reads"):
        flaxvision.load_pretrained(tmp_path / "empty")
    save_numpy({"encoder.conv.weight": np.zeros((2, 2), np.float32)}, tmp_path / "other.safetensors")
    unknown = r"cannot tell the format of .*other.safetensors' \(tensors like encoder.conv.weight\); flaxvision reads transformers ViT"
    with pytest.raises(FlaxvisionError, match=unknown):
        flaxvision.load_pretrained(tmp_path / "other.safetensors")
    with pytest.raises(FlaxvisionError, match=r"no such file or directory: 'missing/model.safetensors'"):
        flaxvision.load_pretrained("missing/model.safetensors")
    with pytest.raises(FlaxvisionError, match="is neither an existing path nor a Hub repo id"):
        flaxvision.load_pretrained("not a repo!")


def test_corrupt_and_truncated_files_are_named(tmp_path):
    tiny_hf(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted download
    truncated = f"cannot read '{weights}': not a valid safetensors file, probably truncated or corrupt.*re-download"
    with pytest.raises(FlaxvisionError, match=truncated):
        flaxvision.load_pretrained(tmp_path / "hf")
    (tmp_path / "vit.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(FlaxvisionError, match=f"cannot read '{tmp_path / 'vit.npz'}': not a valid .npz archive"):
        flaxvision.load_pretrained(tmp_path / "vit.npz")
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "vit",')
    with pytest.raises(FlaxvisionError, match="cannot read '.*config.json': not valid JSON"):
        flaxvision.load_pretrained(tmp_path / "hf")


def test_pickled_checkpoints_are_refused_unless_allowed(tmp_path):
    reference = tiny_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")  # transformers v5 module names (layers.0.attention.q_proj)
    with pytest.raises(FlaxvisionError) as error:
        flaxvision.load_pretrained(tmp_path)
    message = str(error.value)
    assert "pytorch_model.bin' is a pickled PyTorch file, which can run arbitrary code" in message
    assert "safetensors.torch.save_file" in message and "save_pretrained(dir, safe_serialization=True)" in message
    assert "allow_pickle=True" in message
    model = flaxvision.load_pretrained(tmp_path, allow_pickle=True)
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-5)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    pickled: dict[str, Any] = {"embedding/kernel": np.array([{"evil": 1}], dtype=object)}
    np.savez(tmp_path / "vit.npz", **pickled)
    with pytest.raises(FlaxvisionError, match="stores pickled Python objects.*allow_pickle=True"):
        flaxvision.load_pretrained(tmp_path / "vit.npz")


# ---- architectures flaxvision cannot express ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(scale_attn_norm=True), "scale_attn_norm"),
        (dict(scale_mlp_norm=True), "scale_mlp_norm"),
        (dict(proj_bias=False), "proj_bias=False"),
        (dict(final_norm=False), "final_norm=False"),
    ],
)
@pytest.mark.parametrize("with_config", [True, False], ids=["config", "bare"])
def test_timm_variants_flaxvision_cannot_express(tmp_path, kwargs, field, with_config):
    model = tiny_timm(**kwargs)
    if with_config:
        save_for_hf(model, str(tmp_path), safe_serialization=True)
        source = tmp_path
    else:
        source = tmp_path / "bare.safetensors"
        save_file(model.state_dict(), source)
    with pytest.raises(FlaxvisionError, match="timm weights") as error:
        flaxvision.load_pretrained(source)
    message = str(error.value)
    assert field in message or f"{next(iter(kwargs))}=" in message, message
    assert "not supported by flaxvision's ViT" in message


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "swin"}, "model_type='swin' is not supported; flaxvision reads transformers weights of model_type 'vit'"),
        ({"hidden_act": "silu"}, "hidden_act='silu' is not supported; flaxvision ViTs use gelu"),
        ({"image_size": [32, 16]}, r"image_size=\[32, 16\] is not square"),
    ],
)
def test_transformers_configs_flaxvision_cannot_express(tmp_path, change, message):
    tiny_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FlaxvisionError, match=message):
        flaxvision.load_pretrained(tmp_path)


def test_npz_representation_layer_is_refused(tmp_path):
    model = flaxvision.load_pretrained(_saved_timm(tmp_path))
    path = flaxvision.save_pretrained(model, tmp_path / "vit.npz", format="npz")
    arrays: dict[str, Any] = dict(np.load(path)) | {"pre_logits/kernel": np.zeros((192, 192), np.float32)}
    np.savez(path, **arrays)
    with pytest.raises(FlaxvisionError, match="pre_logits representation layer .* is not supported"):
        flaxvision.load_pretrained(path)


def _saved_timm(directory):
    save_for_hf(tiny_timm(), str(directory / "timm"), safe_serialization=True)
    return directory / "timm"


# ---- the Hugging Face Hub ------------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache, repo_id: str, checkpoint_dir, ref: str = "main"):
    """huggingface_hub's cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/<files>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / ref).write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for path in checkpoint_dir.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    return snapshot


def test_hub_offline_and_not_cached_is_one_clear_error(tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest
    with pytest.raises(FlaxvisionError) as error:
        flaxvision.load_pretrained("google/vit-base-patch16-224", cache_dir=tmp_path)
    message = str(error.value)
    assert message.startswith("cannot reach the Hugging Face Hub to fetch 'google/vit-base-patch16-224' and it is not in the cache")
    assert "(HF_HUB_OFFLINE=1)" in message and "pass a local directory" in message and "\n" not in message


def test_hub_cached_repo_loads_offline(tmp_path):
    labels = {0: "ant", 1: "bee", 2: "cat"}
    reference = tiny_hf(tmp_path / "src", id2label=labels, label2id={v: k for k, v in labels.items()})
    snapshot = fake_hub_cache(tmp_path / "cache", "flaxvision-test/tiny-vit", tmp_path / "src")
    for source, kwargs in [("flaxvision-test/tiny-vit", {}), (f"flaxvision-test/tiny-vit@{COMMIT}", {}),
                           ("flaxvision-test/tiny-vit", {"revision": "main"})]:  # fmt: skip
        model, report = flaxvision.load_pretrained(source, cache_dir=tmp_path / "cache", return_report=True, **kwargs)
        assert report.files == (str(snapshot / "model.safetensors"),)
        assert model.label_names == ("ant", "bee", "cat")
    model.eval()
    x = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-5)
    with pytest.raises(FlaxvisionError, match="fetch 'flaxvision-test/tiny-vit' at revision 'v2' and it is not in the cache"):
        flaxvision.load_pretrained("flaxvision-test/tiny-vit@v2", cache_dir=tmp_path / "cache")


def test_hub_environment_variables_in_a_fresh_process(tmp_path):
    """HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE as a user sets them (huggingface_hub reads them at import)."""
    tiny_hf(tmp_path / "src")
    fake_hub_cache(tmp_path / "hub", "flaxvision-test/tiny-vit", tmp_path / "src")
    script = (
        "import flaxvision\n"
        "print(flaxvision.load_pretrained('flaxvision-test/tiny-vit').config.width)\n"
        "try:\n    flaxvision.load_pretrained('google/vit-base-patch16-224')\n"
        "except flaxvision.FlaxvisionError as err:\n    print(err)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    width, message = result.stdout.strip().splitlines()
    assert width == "32"
    assert message == (
        f"cannot reach the Hugging Face Hub to fetch 'google/vit-base-patch16-224' and it is not in the cache "
        f"{tmp_path / 'hub'} (HF_HUB_OFFLINE=1); download it on a connected machine (`hf download "
        "google/vit-base-patch16-224`) and copy the cache, or pass a local directory"
    )


# ---- hardening: config values, layer counts, dtypes, NaN, malformed files (issue 13) -------------------------------


def _edit_config(directory, **changes) -> None:
    config = json.loads((directory / "config.json").read_text()) | changes
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": "768"}, r"config.json': hidden_size='768' should be an integer"),
        ({"num_attention_heads": 0}, r"config.json num_attention_heads=0 is not a positive integer; fix config.json"),
        ({"hidden_size": 10**9}, r"ViTConfig: width must be an integer from 1 to 65536, got 1000000000"),
        ({"num_hidden_layers": 300}, r"transformers weights .*: the config says 300 layers, the tensors hold 1; nothing was loaded"),
        ({"patch_size": -8}, r"ViTConfig: patch_size must be an integer from 1 to 1024, got -8"),
        ({"num_hidden_layers": 1.5}, r"num_hidden_layers=1.5 should be an integer"),
        ({"num_hidden_layers": True}, r"num_hidden_layers=True should be an integer"),  # True == 1 in Python
        ({"layer_norm_eps": float("nan")}, r"layer_norm_eps=nan should be a number"),
        ({"hidden_act": ["gelu"]}, r"hidden_act=\['gelu'\] should be a string"),
        ({"qkv_bias": "no"}, r"qkv_bias='no' should be true or false"),  # bool("no") is True
        ({"image_size": [224, 225]}, r"image_size=\[224, 225\] is not square"),
        ({"id2label": ["a", "b", "c"]}, r"id2label=\['a', 'b', 'c'\] should be a JSON object"),
        ({"id2label": {"0": "a", "1": "b", "5": "c"}}, r"id2label keys should be the class indices '0' .. '2', got \['0', '1', '5'\]"),
        ({"intermediate_size": 60000}, r"the config describes [\d,]+ parameters, the tensors hold 15,075 values"),
    ],
)
def test_config_values_are_one_error_before_anything_is_built(tmp_path, change, message):
    tiny_hf(tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(FlaxvisionError, match=message) as error:
        flaxvision.load_pretrained(tmp_path)
    assert "\n" not in str(error.value)


def test_a_bad_config_is_exit_2_and_one_line_from_the_cli(tmp_path, capsys):
    from tests.helpers import error_lines, run_cli

    tiny_hf(tmp_path / "hf")
    _edit_config(tmp_path / "hf", num_hidden_layers=300)
    code, _, err = run_cli(["predict", tmp_path / "hf", tmp_path / "missing.png"], capsys)
    assert code == 2
    assert error_lines(err) == [f"flaxvision: error: transformers weights '{tmp_path / 'hf'}': the config says 300 layers, "
                                "the tensors hold 1; nothing was loaded - pass the matching weights, or fix their config.json"]  # fmt: skip


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        ("ViTConfig", {"depth": True}, r"ViTConfig: depth must be an integer, got True \(bool\)"),
        ("ViTConfig", {"width": 768.0}, r"ViTConfig: width must be an integer, got 768.0 \(float\)"),
        ("ViTConfig", {"layer_norm_eps": float("inf")}, r"ViTConfig: layer_norm_eps must be a finite number, got inf"),
        ("ViTConfig", {"qkv_bias": 1}, r"ViTConfig: qkv_bias must be True or False, got 1 \(int\)"),
        ("ViTConfig", {"fc_norm": "yes"}, r"ViTConfig: fc_norm must be None or True or False, got 'yes'"),
        ("ViTConfig", {"img_size": 10**5}, r"ViTConfig: img_size must be an integer from 1 to 8192"),
        ("ViTConfig", {"width": 65536, "num_heads": 16, "depth": 1000, "mlp_dim": 4096},
         r"ViTConfig: [\d,]+ parameters \([\d,]+ billion\) is beyond any model flaxvision builds \(at most 100,000,000,000\)"),
        ("ResNetConfig", {"stage_depths": [2, 2, 2, 2]}, r"ResNetConfig: stage_depths must be a tuple of integers, got \[2, 2, 2, 2\] \(list\)"),
        ("ResNetConfig", {"stage_widths": (64, 128, 0, 512)}, r"ResNetConfig: stage_widths\[2\] must be an integer from 1 to 65536, got 0"),
        ("CNNConfig", {"features": (32,)}, r"CNNConfig: features must be a tuple of 2 integers, got \(32,\) \(1 values\)"),
    ],
)  # fmt: skip
def test_config_fields_are_checked_by_their_declared_types(make, kwargs, message):
    with pytest.raises(flaxvision.ConfigError, match=message):
        getattr(flaxvision.models, make)(**kwargs)


def test_integer_and_bool_tensors_are_refused_float16_is_read(tmp_path):
    reference = tiny_hf(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "vit.encoder.layer.0.attention.attention.query.weight"
    for dtype in (np.int64, np.bool_):
        save_numpy(state | {key: state[key].astype(dtype)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(FlaxvisionError, match=rf"1 tensor\(s\) of float parameters hold other types: {key} \({np.dtype(dtype)}\); flaxvision does not cast"):
            flaxvision.load_pretrained(tmp_path)
    save_numpy({k: v.astype(np.float16) for k, v in state.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = flaxvision.load_pretrained(tmp_path)
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=2e-2)  # float16 weights, cast up


def test_nonfinite_weights_warn_on_load_and_are_not_exported(tmp_path, caplog, capsys):
    from tests.helpers import error_lines, run_cli

    tiny_hf(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    key = "vit.encoder.layer.0.output.dense.bias"
    state[key][:3] = [np.nan, np.inf, np.nan]
    save_numpy(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    named = rf"1 tensor\(s\) hold NaN or Inf values: {key} \(2 NaN, 1 Inf\)"
    with caplog.at_level("WARNING"):
        model = flaxvision.load_pretrained(tmp_path / "hf")
    assert re.search(named, caplog.text) and "outputs will be NaN" in caplog.text
    with pytest.raises(FlaxvisionError, match=named + "; nothing was loaded"):
        flaxvision.load_pretrained(tmp_path / "hf", nonfinite="error")
    with pytest.raises(flaxvision.ConfigError, match="nonfinite must be one of warn, error, got 'ignore'"):
        flaxvision.load_pretrained(tmp_path / "hf", nonfinite="ignore")
    with pytest.raises(FlaxvisionError, match=r"the model's 1 tensor\(s\) hold NaN or Inf values: blocks.0.mlp.fc2.bias \(2 NaN, 1 Inf\); nothing was written"):
        flaxvision.save_pretrained(model, tmp_path / "out", format="timm")
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(["export", tmp_path / "hf", "--format", "timm", "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and re.search(named, err), err
    assert not (tmp_path / "out").exists()


def test_malformed_npz_archives_are_named(tmp_path):
    (tmp_path / "text.npz").write_bytes(b"hello")  # np.load takes any non-zip for a pickle and blames allow_pickle
    with pytest.raises(FlaxvisionError, match=r"text.npz': not a valid .npz archive, .*\(it is not a zip archive\)"):
        flaxvision.load_pretrained(tmp_path / "text.npz")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("embedding/kernel.npy", header.getvalue() + bytes(64))
    with pytest.raises(FlaxvisionError, match=r"embedding/kernel claims shape \(1000000, 1000000\) of float32, more than its 192 bytes"):
        flaxvision.load_pretrained(tmp_path / "huge.npz")
    np.savez(tmp_path / "scalar.npz", **{"embedding/kernel": np.float32(1), "cls": np.zeros((1, 1, 8), np.float32)})
    with pytest.raises(FlaxvisionError, match=r"scalar.npz': embedding/kernel is a 0-d array; every ViT parameter has at least one axis"):
        flaxvision.load_pretrained(tmp_path / "scalar.npz")
    stacked: dict[str, Any] = {"embedding/kernel": np.zeros((8, 8, 3, 8), np.float32), "Transformer/encoderblock/LayerNorm_0/scale": np.float32(1)}
    np.savez(tmp_path / "stacked.npz", **stacked)
    with pytest.raises(FlaxvisionError, match=r"'Transformer/encoderblock/LayerNorm_0/scale' is a 0-d array; a stacked \(nn.scan\)"):
        flaxvision.load_pretrained(tmp_path / "stacked.npz")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda data, size: struct.pack("<Q", 2**63) + data[8:], "header too large"),
        (lambda data, size: struct.pack("<Q", 0) + data[8:], "invalid JSON in header"),
        (lambda data, size: struct.pack("<Q", len(data) + 10) + data[8:], "invalid header length"),
        (lambda data, size: struct.pack("<Q", 5) + b"{nope" + data[8 + size :], "invalid JSON in header"),
        (lambda data, size: data.replace(b'"data_offsets":[0,12]', b'"data_offsets":[0,99999]', 1), "offset"),
        (lambda data, size: data.replace(b'"dtype":"F32"', b'"dtype":"Q7"', 1), "unknown variant `Q7`"),
        (lambda data, size: data[:5], "header too small"),
    ],
    ids=["length-2**63", "length-0", "longer-than-file", "not-json", "offsets", "unknown-dtype", "5-bytes"],
)
def test_malformed_safetensors_headers_are_named(tmp_path, corrupt, message):
    tiny_hf(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(corrupt(data, struct.unpack("<Q", data[:8])[0]))
    with pytest.raises(FlaxvisionError, match=rf"cannot read '{path}': not a valid safetensors file, .*{message}"):
        flaxvision.load_pretrained(tmp_path)


def test_directories_without_weights_and_stray_shards(tmp_path):
    tiny_hf(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(FlaxvisionError, match=r"no weights found in '.*hf' \(it holds config.json\)"):
        flaxvision.load_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(FlaxvisionError, match=r"weight_map names '../elsewhere.safetensors', not a file next to the index"):
        flaxvision.load_pretrained(tmp_path / "hf")


def test_bare_transformers_safetensors_needs_the_tensors_it_infers_from(tmp_path):
    tiny_hf(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    del state["vit.embeddings.position_embeddings"]
    save_numpy(state, tmp_path / "bare.safetensors")
    with pytest.raises(FlaxvisionError, match=r"cannot infer the architecture without 'vit.embeddings.position_embeddings'; add the config.json"):
        flaxvision.load_pretrained(tmp_path / "bare.safetensors")


def test_bare_transformers_safetensors_infers_the_architecture(tmp_path):
    reference = tiny_hf(tmp_path / "hf", hidden_size=64, num_attention_heads=1)  # width 64: one 64-d head, the default
    save_numpy(load_file(tmp_path / "hf" / "model.safetensors"), tmp_path / "bare.safetensors")
    model = flaxvision.load_pretrained(tmp_path / "bare.safetensors")
    assert (model.config.width, model.config.depth, model.config.num_heads, model.config.mlp_dim) == (64, 1, 1, 64)
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-5)


@pytest.mark.parametrize(
    "library, key, config",
    [("timm", "patch_embed.proj.weight", True), ("timm", "pos_embed", True), ("timm", "head.weight", True),
     ("transformers", "classifier.weight", False), ("transformers", "vit.embeddings.patch_embeddings.projection.weight", False)],
)  # fmt: skip
def test_a_zero_d_tensor_the_architecture_is_read_from_is_named(tmp_path, library, key, config):
    if library == "timm":
        save_for_hf(tiny_timm(), str(tmp_path), safe_serialization=True)
    else:
        tiny_hf(tmp_path)
        (tmp_path / "config.json").unlink()  # a bare file: the architecture comes from the shapes
    state = load_file(tmp_path / "model.safetensors")
    save_numpy(state | {key: np.asarray(state[key].reshape(-1)[0])}, tmp_path / "model.safetensors")
    with pytest.raises(FlaxvisionError, match=rf"'{re.escape(key)}' has shape \(\), fewer than the \d axes it needs"):
        flaxvision.load_pretrained(tmp_path)
