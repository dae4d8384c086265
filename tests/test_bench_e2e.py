"""`flaxvision bench e2e`: the generated dataset, the PyTorch twins of the models, the recipe checks, and one tiny
run of both sides through the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import flaxvision
from flaxvision.data import load, make_loader
from flaxvision.data.synthetic import class_images, write_class_dataset
from flaxvision.errors import ConfigError
from flaxvision.models.registry import abstract_model
from flaxvision.presets import get_preset
from flaxvision.train import e2e_bench, torch_reference
from tests.helpers import cli_env


def cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, with one CPU device and no huge-page re-exec (cli_env): a faster start."""
    return subprocess.run([sys.executable, "-m", "flaxvision.cli", *args], capture_output=True, text=True,
                          timeout=300, env=cli_env())  # fmt: skip


@pytest.mark.parametrize(("side", "channels"), [(28, 1), (32, 3)])
def test_generated_dataset_reads_like_mnist_and_cifar(tmp_path, side, channels):
    write_class_dataset(tmp_path / "d", train=40, test=20, side=side, channels=channels, seed=3)
    data = load(str(tmp_path / "d"), val_split="test")
    assert data.class_names == tuple(str(i) for i in range(10)) and not data.val_held_out
    assert (len(data.train), len(data.val), data.num_channels) == (40, 20, channels)
    preprocessing = flaxvision.Preprocessing(img_size=side).for_channels(channels)
    batch = next(iter(make_loader(data.val, preprocessing=preprocessing, batch_size=20, train=False)))
    expected, labels = class_images(20, side=side, channels=channels, seed=3, split=1)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (20, side, side, channels)
    np.testing.assert_array_equal(batch["image"], expected)  # PNG is lossless; the test split is split 1
    np.testing.assert_array_equal(batch["label"], labels)


def test_generated_images_are_deterministic_and_carry_their_class():
    a, labels = class_images(600, side=28, channels=1, seed=0)
    b, _ = class_images(600, side=28, channels=1, seed=0)
    c, _ = class_images(600, side=28, channels=1, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    test, test_labels = class_images(600, side=28, channels=1, seed=0, split=1)
    assert not np.array_equal(a, test)
    # Learnable but not trivial: the nearest class mean (of the training split) is right well above chance
    # (10%) on the test split, yet far from always: shifts, noise and the faint second class are in the way.
    means = np.stack([a[labels == k].reshape(-1, 784).mean(0) for k in range(10)]).astype(np.float32)
    flat = test.reshape(-1, 784).astype(np.float32)
    predicted = ((flat[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert 0.3 < (predicted == test_labels).mean() < 0.95


@pytest.mark.parametrize("name", ["cnn", "resnet18_cifar"])
def test_torch_models_have_flaxvision_parameter_counts(name):
    config = flaxvision.model_config(name)
    ours = abstract_model(config).num_params()
    theirs = torch_reference.build_model(name, in_chans=config.in_chans, img_size=config.img_size,
                                         num_classes=config.num_classes)  # fmt: skip
    assert sum(p.numel() for p in theirs.parameters()) == ours == config.param_count()
    assert e2e_bench.TORCH_MODELS == torch_reference.MODELS
    assert theirs(torch.zeros(2, config.in_chans, config.img_size, config.img_size)).shape == (2, config.num_classes)


def test_torch_adamw_decays_only_what_flaxvision_decays():
    model = torch_reference.build_model("resnet18_cifar", in_chans=3, img_size=32, num_classes=10)
    recipe = get_preset("cifar10-resnet18")
    spec = {k: getattr(recipe, k) for k in ("optimizer", "lr", "b1", "b2", "weight_decay", "momentum", "nesterov")}
    groups = torch_reference.make_optimizer(model, spec).param_groups
    decayed, plain = groups
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(plain["params"]) == 2 * 20 + 1  # 20 BatchNorms (scale, offset) and the head's bias


def test_pad_crop_flip_cuts_a_window_of_the_padded_image():
    images = torch.arange(4 * 3 * 8 * 8, dtype=torch.int32).reshape(4, 3, 8, 8).to(torch.uint8)
    out = torch_reference.pad_crop_flip(images, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(4):
        windows = [padded[i, :, t:t + 8, s:s + 8] for t in range(5) for s in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_set_overrides_parse_like_recipe_fields():
    assert e2e_bench.parse_override("batch_size=64") == ("batch_size", 64)
    assert e2e_bench.parse_override("hflip=false") == ("hflip", False)
    assert e2e_bench.parse_override("ema-decay=none") == ("ema_decay", None)
    assert e2e_bench.parse_override("lr=3e-4") == ("lr", 3e-4)
    with pytest.raises(ConfigError, match="'batchsize=4'.*did you mean batch_size"):
        e2e_bench.parse_override("batchsize=4")
    with pytest.raises(ConfigError, match="'maybe' is not a bool value for hflip"):
        e2e_bench.parse_override("hflip=maybe")


def test_torch_side_refuses_a_recipe_it_does_not_reproduce(tmp_path):
    with pytest.raises(ConfigError, match=r"mixup=0.2: the PyTorch side runs mixup=0.0; drop that --set or pass --no-torch"):
        e2e_bench.torch_spec(get_preset("mnist-cnn").replace(mixup=0.2), str(tmp_path))
    with pytest.raises(ConfigError, match="model='vit_tiny_patch16_224'"):
        e2e_bench.torch_spec(get_preset("digits-vit"), str(tmp_path))


def test_without_torch_one_line_names_pip_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "torch" else object())
    with pytest.raises(e2e_bench.TorchMissing, match="pip install torch"):
        e2e_bench.benchmark_e2e(get_preset("mnist-cnn").replace(dataset="x"), preset="mnist-cnn")


def test_bench_e2e_json_runs_both_sides_on_generated_data(tmp_path):
    done = cli("bench", "e2e", "--preset", "mnist-cnn", "--generate", "128", "--test-size", "32", "--out",
               str(tmp_path / "data"), "--epochs", "2", "--set", "batch_size=32", "--set", "eval_batch_size=32",
               "--torch-threads", "1", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["preset"] == "mnist-cnn" and out["batch_size"] == 32 and out["epochs"] == 2
    assert out["machine"]["cores"] >= 1 and out["machine"]["cpu"]
    for side in ("flaxvision", "torch"):
        r = out[side]
        assert r["steady"] and len(r["epochs"]) == 2, side
        assert [e["train_images"] for e in r["epochs"]] == [128, 128], side  # 4 full batches of 32 per epoch
        assert r["images_per_second"] > 0 and r["wall_seconds"] > r["epochs"][1]["train_seconds"] > 0, side
        assert 0.0 <= r["final_accuracy"] <= 1.0, side
    assert out["torch"]["param_count"] == flaxvision.model_config("cnn").param_count() and out["torch"]["threads"] == 1
    assert out["ratio"]["images_per_second"] == pytest.approx(
        out["flaxvision"]["images_per_second"] / out["torch"]["images_per_second"])
    assert (tmp_path / "data" / "dataset_dict.json").exists()  # --out keeps the data
