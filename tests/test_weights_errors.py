"""Pretrained weights, bad input: every problem is one FlaxvisionError that says what, which value, what to do.

Also the Hub: offline with nothing cached (a clear error), and a cached repo loading offline, through the real
huggingface_hub cache layout. Nothing is downloaded.
"""

import json
import os
import subprocess
import sys
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
        (dict(reg_tokens=4), "reg_tokens (register tokens)"),
        (dict(init_values=1e-5), "init_values (layer scale)"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(class_token=False, global_pool="avg"), "class_token=False (no CLS token)"),
        (dict(no_embed_class=True), "no_embed_class=True"),
        (dict(pre_norm=True), "pre_norm"),
        (dict(global_pool="map"), "global_pool='map' (attention pooling)"),
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
