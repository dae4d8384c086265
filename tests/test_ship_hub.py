"""The model card, `flaxvision push` and transformers' image-classification pipeline on flaxvision's exports.

One finished run (the tiny builtin:digits recipe, 1 epoch: a 1-channel ViT) is made for the module. The Hub itself
is out of reach here: push is checked up to the network (HF_HUB_OFFLINE, no token, an unreachable endpoint) and
through --dry-run, whose folder is what would be uploaded. The pipeline is the real transformers one.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

import flaxvision
from tests.helpers import TINY_CLI, assert_unchanged, error_lines, run_cli, snapshot

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run of `flaxvision train` (the command and the hardware are recorded in summary.json)."""
    directory = tmp_path_factory.mktemp("hub") / "digits"
    from flaxvision.cli import main

    assert main(["train", *TINY_CLI, "--epochs", "1", "--checkpoint-every", "none", "--run-dir", str(directory)]) == 0
    return directory


def split_card(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def gray_images(directory: Path, size: int, count: int = 4) -> list[Path]:
    """Gray (R = G = B) RGB PNGs of blobs at the model's size: the luma stem is exact on them."""
    rng, paths = np.random.default_rng(5), []
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        cy, cx = rng.uniform(0, size, 2)
        value = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 4) ** 2))).astype(np.uint8)
        path = directory / f"gray{i}.png"
        Image.fromarray(np.stack([value] * 3, -1)).save(path)
        paths.append(path)
    return paths


def colour_images(directory: Path, size: int, count: int = 4) -> list[Path]:
    rng, paths = np.random.default_rng(6), []
    for i in range(count):
        image = np.zeros((size, size, 3), np.uint8)
        image[..., i % 3] = rng.integers(120, 255)
        image[rng.integers(0, size // 2) :, rng.integers(0, size // 2) :] = rng.integers(0, 255, 3)
        path = directory / f"colour{i}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def predict_json(model_dir: Path, images: list[Path], capsys) -> list[dict[str, Any]]:
    code, out, err = run_cli(["predict", model_dir, *images, "--json", "--top-k", "3", "--batch-size", "8"], capsys)
    assert code == 0, err
    return json.loads(out)


def pipeline_top(model_dir: Path, images: list[Path]) -> list[list[dict[str, Any]]]:
    classify = transformers.pipeline("image-classification", model=str(model_dir), device="cpu")
    return [classify(str(p), top_k=3) for p in images]


def assert_same_predictions(ours: list[dict[str, Any]], theirs: list[list[dict[str, Any]]]) -> None:
    for row, top in zip(ours, theirs, strict=True):
        assert row["predictions"][0]["label"] == top[0]["label"], (row, top)
        np.testing.assert_allclose([p["probability"] for p in row["predictions"]], [t["score"] for t in top], atol=1e-4)


# ---- summary.json and the card ----------------------------------------------------------------------------------


def test_summary_records_the_command_and_the_hardware(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    argv = shlex.split(summary["command"])
    assert argv[:2] == ["flaxvision", "train"] and argv[argv.index("--run-dir") + 1] == str(run_dir)
    assert argv[argv.index("--epochs") + 1] == "1" and "--no-report" in argv
    # The recorded command parses back to the recipe the run has.
    from flaxvision.cli import build_parser
    from flaxvision.commands.train import resolve_config

    _, recipe = resolve_config(build_parser().parse_args(argv[1:]))
    assert recipe.to_dict() == json.loads((run_dir / "config.json").read_text())["train_config"]
    hardware = summary["hardware"]
    assert hardware["platform"] == "cpu" and hardware["device_count"] >= 1 and hardware["process_count"] == 1
    assert isinstance(hardware["device_kind"], str) and "cpu" in hardware


def test_card_holds_the_metrics_with_their_split_the_command_data_and_hardware(run_dir):
    from flaxvision.ship.card import model_card

    evaluation = json.loads((run_dir / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    meta, body = split_card(model_card(run_dir, layout="transformers", repo_id="me/digits-vit"))
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert (
        "flaxvision" in meta["tags"] and "base_model" not in meta and "datasets" not in meta
    )  # from scratch, builtin data
    (result,) = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "digits-vit" and result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "builtin:digits", "type": "builtin:digits", "split": "train held-out 0.2"}
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values == {
        "accuracy": evaluation["val_accuracy"],
        "top_5_accuracy": evaluation["val_top5_accuracy"],
        "loss": evaluation["val_loss"],
    }
    assert summary["command"] in body and "flaxvision train --from-config flaxvision_run/config.json" in body
    row = f"| raw, final (these weights) | train held-out 0.2 | {evaluation['val_count']} | {evaluation['val_accuracy']:.4f} |"
    assert row in body and f"at step {summary['best_step']}" in body
    assert (
        f"| platform | {summary['hardware']['platform']} |" in body and f"| CPU | {summary['hardware']['cpu']}" in body
    )
    assert "- dataset: `builtin:digits`" in body and "classes (10): `0`, `1`" in body and "trained from scratch" in body
    assert 'pipeline("image-classification", model="me/digits-vit")' in body and "luma weights" in body


def test_card_of_a_hub_fine_tune_names_base_model_and_dataset_and_says_not_recorded(run_dir, tmp_path):
    """A run fine-tuned from a Hub checkpoint on a Hub dataset, whose summary.json predates command/hardware."""
    from flaxvision.ship.card import model_card

    other = tmp_path / "run"
    other.mkdir()
    config = json.loads((run_dir / "config.json").read_text())
    config["train_config"].update(
        pretrained="google/vit-base-patch16-224@main", dataset="ethz/food101", val_split="validation"
    )
    config["class_names"] = [f"class{i}" for i in range(101)]
    (other / "config.json").write_text(json.dumps(config))
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("command", "hardware"):
        summary.pop(key)
    (other / "summary.json").write_text(json.dumps(summary))
    meta, body = split_card(model_card(other, layout="timm"))
    assert meta["base_model"] == "google/vit-base-patch16-224" and meta["datasets"] == ["ethz/food101"]
    assert meta["library_name"] == "timm" and "model-index" not in meta  # no eval.json: no results to claim
    assert "fine-tuned from [google/vit-base-patch16-224]" in body and 'timm.create_model("hf-hub:OWNER/NAME"' in body
    assert "```bash\nnot recorded\n```" in body and "| platform | not recorded |" in body
    assert "`class19`, ... (81 more)" in body and "validation split: validation" in body


def test_card_command_stdout_and_out(run_dir, tmp_path, capsys):
    code, out, err = run_cli(["card", run_dir, "--repo-id", "me/digits-vit"], capsys)
    assert code == 0, err
    from flaxvision.ship.card import model_card

    assert out == model_card(run_dir, layout="transformers", repo_id="me/digits-vit")  # model/ is transformers' layout
    card = tmp_path / "README.md"
    code, out, err = run_cli(["card", run_dir, "--out", card, "--format", "flaxvision"], capsys)
    assert code == 0 and out == "" and card.read_text().startswith("---\nlibrary_name: flaxvision\n")
    code, _, err = run_cli(["card", tmp_path], capsys)
    assert code == 2 and error_lines(err) == [
        f"flaxvision: error: {tmp_path} is not a flaxvision run directory (no config.json "
        "with a train_config); pass the --run-dir of a `flaxvision train` run"
    ]


# ---- push: everything refused before the network, and --dry-run --------------------------------------------------


def test_push_offline_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    before = snapshot(run_dir)
    code, out, err = run_cli(["push", run_dir, "me/digits-vit"], capsys)
    assert code == 2 and out == ""
    assert error_lines(err) == [
        "flaxvision: error: HF_HUB_OFFLINE=1 is set and push needs the Hub: unset HF_HUB_OFFLINE, "
        "or write the folder that would be uploaded with --dry-run DIR"
    ]
    assert_unchanged(run_dir, before)
    assert not any(tmp_path.iterdir())


def test_push_without_a_token_and_with_an_unreachable_hub_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    code, _, err = run_cli(["push", run_dir, "me/digits-vit"], capsys)
    assert code == 2 and error_lines(err) == [
        "flaxvision: error: no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token"
    ]
    # A token, and a Hub that does not answer (a closed local port): whoami fails, one line, nothing uploaded.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    code, _, err = run_cli(["push", run_dir, "me/digits-vit", "--token", "hf_not_a_real_token"], capsys)
    (line,) = error_lines(err)
    assert code == 2 and line.startswith(
        "flaxvision: error: cannot reach the Hub at http://127.0.0.1:9 while checking the token"
    )
    assert line.endswith("check the network, or write the folder with --dry-run DIR")


@pytest.mark.parametrize("repo_id", ["bad repo!!", "a/b/c", "me/name-"])
def test_push_refuses_a_bad_repo_id_in_one_line(run_dir, tmp_path, capsys, repo_id):
    code, _, err = run_cli(["push", run_dir, repo_id, "--dry-run", tmp_path / "out"], capsys)
    (line,) = error_lines(err)
    assert code == 2 and line.startswith(f"flaxvision: error: REPO_ID {repo_id!r} is not a valid Hub repo id")
    assert not (tmp_path / "out").exists()


def test_push_dry_run_writes_the_folder_that_the_pipeline_loads_with_predicts_top1(run_dir, tmp_path, capsys):
    """The 1-channel ViT of the run: a luma-tiled 3-channel stem in the upload, the same top-1 as predict."""
    out = tmp_path / "upload"
    code, stdout, err = run_cli(["push", run_dir, "me/digits-vit", "--dry-run", out], capsys)
    assert code == 0, err
    assert stdout.startswith(f"flaxvision: wrote the folder for me/digits-vit (transformers layout) to {out}")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "flaxvision_run",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert sorted(p.name for p in (out / "flaxvision_run").iterdir()) == [
        "config.json",
        "eval.json",
        "metrics.jsonl",
        "summary.json",
    ]
    meta, _ = split_card((out / "README.md").read_text())
    assert meta["model-index"][0]["name"] == "digits-vit"
    config = json.loads((out / "config.json").read_text())
    assert config["num_channels"] == 3 and config["flaxvision_grayscale_stem"]["in_chans"] == 1
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]
    # flaxvision reads the upload back as the run's 1-channel model, bit for bit.
    from flaxvision.weights.convert import weight_state

    ours, back = flaxvision.load_pretrained(run_dir / "model"), flaxvision.load_pretrained(out)
    assert back.config == ours.config and back.config.in_chans == 1 and back.preprocessing == ours.preprocessing
    a, b = weight_state(ours), weight_state(back)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    images = gray_images(tmp_path, ours.config.img_size)
    assert_same_predictions(predict_json(run_dir, images, capsys), pipeline_top(out, images))


# ---- every transformers family: pipeline top-1 == flaxvision predict top-1 -------------------------------------------

TINY_VIT: dict[str, Any] = dict(img_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "vit": ("vit_tiny_patch16_224", TINY_VIT, "ViTForImageClassification"),
    "deit-distilled": ("deit_base_distilled_patch16_224", TINY_VIT, "DeiTForImageClassificationWithTeacher"),
    "dinov2": (
        "vit_tiny_patch16_224",
        dict(TINY_VIT, init_values=0.5, global_pool="token_avg"),
        "Dinov2ForImageClassification",
    ),
    "siglip": (
        "vit_tiny_patch16_224",
        dict(TINY_VIT, class_token=False, global_pool="avg", fc_norm=False),
        "SiglipForImageClassification",
    ),
    "convnext": (
        "convnext_tiny",
        dict(img_size=32, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
        "ConvNextForImageClassification",
    ),
    "resnet": (
        "resnet18",
        dict(img_size=32, stage_depths=(1, 1, 1, 1), stage_widths=(8, 16, 24, 32)),
        "ResNetForImageClassification",
    ),
}
LABELS = ("tabby cat", "red fox", "hen", "daisy")


def randomised(name: str, overrides: dict[str, Any], seed: int) -> Any:
    """A tiny model with random values in every parameter (no zero head, no unit gains: each one matters), built
    from the arrays without running the initialisers (cheap), and identity eval geometry (images at the model's
    size, squashed, no crop), so that both sides see the same pixels."""
    import dataclasses

    from flaxvision.models.registry import default_preprocessing, model_config
    from flaxvision.weights.convert import param_shapes
    from flaxvision.weights.loader import materialise

    config = model_config(name, num_classes=len(LABELS), **overrides)
    rng = np.random.default_rng(seed)

    def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key.endswith(".var"):  # a batch norm's running variance
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return (0.3 * rng.standard_normal(shape) + (1.0 if key.endswith(".scale") else 0.0)).astype(np.float32)

    model = materialise(config, {k: value(k, s) for k, s in param_shapes(config).items()})
    model.preprocessing = dataclasses.replace(default_preprocessing(config), crop_pct=1.0, resize_mode="squash")
    model.label_names = LABELS
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_top1_equals_predict_top1(family, tmp_path, capsys):
    name, overrides, architecture = FAMILIES[family]
    model = randomised(name, overrides, seed=len(family))
    native = flaxvision.save_pretrained(model, tmp_path / "flaxvision", format="flaxvision")
    exported = flaxvision.save_pretrained(model, tmp_path / "transformers", format="transformers")
    assert json.loads((exported / "config.json").read_text())["architectures"] == [architecture]
    images = colour_images(tmp_path, model.config.img_size) + gray_images(tmp_path, model.config.img_size, 2)
    assert_same_predictions(predict_json(native, images, capsys), pipeline_top(exported, images))


def test_gray_stem_round_trip_is_bit_exact_and_a_stem_trained_on_colour_since_stays_rgb(tmp_path, caplog):
    from safetensors.numpy import load_file, save_file

    from flaxvision.weights.gray_stem import LUMA, tile_kernel, untile_kernel

    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 1e3):
        kernel = (rng.standard_normal((3, 3, 1, 256)) * scale).astype(np.float32)  # HWIO
        tiled = tile_kernel(kernel, axis=2)
        np.testing.assert_allclose(tiled, kernel * np.asarray(LUMA, np.float32).reshape(1, 1, 3, 1), rtol=1e-6)
        back = untile_kernel(tiled, axis=2)
        assert back is not None and np.array_equal(back, kernel)
    model = randomised("vit_tiny_patch16_224", dict(TINY_VIT, in_chans=1), seed=3)
    out = flaxvision.save_pretrained(model, tmp_path / "hf", format="transformers")
    assert flaxvision.load_pretrained(out).config.in_chans == 1
    tensors = load_file(out / "model.safetensors")
    tensors["vit.embeddings.patch_embeddings.projection.weight"][:, 0] += 0.01  # as fine-tuning on RGB would
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        back = flaxvision.load_pretrained(out)
    assert back.config.in_chans == 3 and "no longer luma-tiled; loaded as a 3-channel model" in caplog.text
