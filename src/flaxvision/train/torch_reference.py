"""The PyTorch side of `flaxvision bench e2e`: flaxvision's `cnn` and `resnet18_cifar` and a preset's recipe in
plain PyTorch eager, on uint8 tensors held in memory.

This file imports neither jax nor flaxvision, so that `bench e2e` runs it as a script in a process of its own
(no XLA thread pool beside torch's):

    python src/flaxvision/train/torch_reference.py SPEC_JSON        # prints one JSON object on its last line

SPEC_JSON is what `e2e_bench.torch_spec` writes: the dataset directory and splits, the model name, its input
shape, mean/std and class count, the recipe's optimizer, batch sizes, epochs and augmentation, and torch's
thread count (None: every core, torch.set_num_threads(os.cpu_count())).

What "the same" means here, module by module (read against models/cnn.py and models/resnet.py):
- Convolutions and linears are initialised as Flax's: LeCun-normal (truncated, fan-in) kernels and zero biases;
  ResNet convolutions He-normal with fan-out (models/resnet.py `_conv`). BatchNorm momentum 0.1 / eps 1e-5 are
  Flax's 0.9 / 1e-5. The CNN flattens NCHW where flaxvision flattens NHWC: the same layer, its rows permuted.
- AdamW: optax's and torch's weight decay are both decoupled and scaled by the learning rate
  (p <- p - lr * (adam + wd * p)); flaxvision decays only tensors of rank >= 2 (train/optim.py `_decay_mask`),
  so biases and BatchNorm scales/offsets go to a group without decay. eps 1e-8 in both.
- Data: decoded once (not timed) into one uint8 NCHW tensor per split, as torchvision's MNIST and CIFAR10 keep
  theirs; each epoch is a `torch.randperm` and batches indexed out of the tensor. No DataLoader: with the whole
  set in memory as a tensor, the index loop is what plain eager PyTorch does, and it has no worker start-up to
  count. Incomplete last batches are dropped, as flaxvision drops them.
- CIFAR augmentation (pad 4 with zeros, random 32x32 crop, horizontal flip with p 0.5) is done on the uint8
  batch, per image, before normalising ((x / 255 - mean) / std); MNIST has none.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("cnn", "resnet18_cifar")


# ---- models -----------------------------------------------------------------------------------------------------


def _lecun_normal_(layer: nn.Conv2d | nn.Linear) -> None:
    """Flax's default kernel init: variance 1 / fan_in, a normal truncated at 2 std (rescaled to keep the
    variance, as jax.nn.initializers.variance_scaling does)."""
    fan_in = layer.weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class CNN(nn.Module):
    """models/cnn.py: conv32 ReLU avgpool2 conv64 ReLU avgpool2 dense256 ReLU dense(classes), 'SAME' 3x3 convs."""

    def __init__(self, in_chans: int, img_size: int, num_classes: int, features=(32, 64), hidden: int = 256):
        super().__init__()
        c1, c2 = features
        self.conv1 = nn.Conv2d(in_chans, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear((img_size // 4) ** 2 * c2, hidden)
        self.head = nn.Linear(hidden, num_classes)
        for layer in (self.conv1, self.conv2, self.fc1, self.head):
            _lecun_normal_(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc1(x.flatten(1))))


def _conv(cin: int, cout: int, k: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # std sqrt(2 / fan_out), untruncated
    return conv


def _bn(features: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(features, momentum=0.1, eps=1e-5)


class Block(nn.Module):
    """models/resnet.py's basic block: 3x3 conv (stride) BN ReLU 3x3 conv BN, + shortcut (1x1 conv + BN when the
    stride or width changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, cout, 3, stride), _bn(cout)
        self.conv2, self.bn2 = _conv(cout, cout, 3, 1), _bn(cout)
        self.downsample = nn.Sequential(_conv(cin, cout, 1, stride), _bn(cout)) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + shortcut)


class ResNet18Cifar(nn.Module):
    """models/resnet.py with stem "cifar": 3x3 stride-1 conv BN ReLU, 2x2 max pool; stages 64-128-256-512 of two
    basic blocks (stride 2 from the second stage on); global average pool; linear head."""

    def __init__(self, in_chans: int, num_classes: int, widths=(64, 128, 256, 512), depths=(2, 2, 2, 2)):
        super().__init__()
        self.conv1, self.bn1 = _conv(in_chans, widths[0], 3, 1), _bn(widths[0])
        blocks, cin = [], widths[0]
        for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            for i in range(depth):
                blocks.append(Block(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        _lecun_normal_(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        return self.head(self.blocks(x).mean(dim=(2, 3)))


def build_model(name: str, *, in_chans: int, img_size: int, num_classes: int) -> nn.Module:
    if name == "cnn":
        return CNN(in_chans, img_size, num_classes)
    if name == "resnet18_cifar":
        return ResNet18Cifar(in_chans, num_classes)
    raise ValueError(f"no PyTorch reference for model {name!r}; there is one for {', '.join(MODELS)}")


def make_optimizer(model: nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """torch's counterpart of train/optim.py's optimizer (constant learning rate)."""
    if spec["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"], nesterov=spec["nesterov"])
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec["lr"], betas=(spec["b1"], spec["b2"]), eps=1e-8)


# ---- data ---------------------------------------------------------------------------------------------------------


def read_split(directory: str, split: str, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A save_to_disk split as (uint8 images N x C x H x W, int64 labels), decoded once."""
    import datasets
    from PIL import Image

    table = datasets.load_from_disk(directory)[split]
    assert isinstance(table, datasets.Dataset), f"{directory} holds no splits (a DatasetDict) to read {split!r} from"
    image_column = next(k for k, f in table.features.items() if isinstance(f, datasets.Image))
    label_column = next(k for k, f in table.features.items() if isinstance(f, datasets.ClassLabel))
    table = table.cast_column(image_column, datasets.Image(decode=False))
    mode = "L" if in_chans == 1 else "RGB"
    images = np.stack([np.asarray(Image.open(io.BytesIO(item["bytes"])).convert(mode)) for item in table[image_column]])
    images = images[..., None] if in_chans == 1 else images
    labels = torch.as_tensor(np.asarray(table[label_column], np.int64))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def pad_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per image: zero-pad by `pad`, crop a random window of the original size, flip left-right with p 0.5."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (top[:, None] + torch.arange(h))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, None, :]
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


# ---- the run --------------------------------------------------------------------------------------------------------


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """The recipe of `spec`; per-epoch train and eval seconds (own clock) and test accuracy."""
    torch.set_num_threads(spec.get("threads") or os.cpu_count() or 1)
    torch.manual_seed(spec["seed"])
    generator = torch.Generator().manual_seed(spec["seed"])
    start = time.perf_counter()
    train_x, train_y = read_split(spec["dataset"], spec["train_split"], spec["in_chans"])
    test_x, test_y = read_split(spec["dataset"], spec["val_split"], spec["in_chans"])
    decode_seconds = time.perf_counter() - start

    start = time.perf_counter()
    model = build_model(spec["model"], in_chans=spec["in_chans"], img_size=spec["img_size"], num_classes=spec["num_classes"])
    optimizer = make_optimizer(model, spec)
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def inputs(images: torch.Tensor) -> torch.Tensor:
        return (images.float() * (1.0 / 255.0) - mean) / std

    batch, steps = spec["batch_size"], len(train_x) // spec["batch_size"]
    epochs = []
    for _ in range(spec["epochs"]):
        clock = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(steps):
            index = order[i * batch:(i + 1) * batch]
            images = train_x[index]
            if spec["augment"] == "cifar":
                images = pad_crop_flip(images, 4, generator)
            loss = F.cross_entropy(model(inputs(images)), train_y[index], label_smoothing=spec["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_seconds = time.perf_counter() - clock
        clock = time.perf_counter()
        model.eval()
        correct, total_loss = 0, 0.0
        with torch.inference_mode():
            for i in range(0, len(test_x), spec["eval_batch_size"]):
                logits = model(inputs(test_x[i:i + spec["eval_batch_size"]]))
                labels = test_y[i:i + spec["eval_batch_size"]]
                correct += int((logits.argmax(1) == labels).sum())
                total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        epochs.append({"train_seconds": train_seconds, "eval_seconds": time.perf_counter() - clock,
                       "train_images": steps * batch, "val_accuracy": correct / len(test_x),
                       "val_loss": total_loss / len(test_x)})  # fmt: skip
    return {
        "epochs": epochs, "wall_seconds": time.perf_counter() - start, "decode_seconds": decode_seconds,
        "param_count": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }  # fmt: skip


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(json.dumps(train(json.load(f))))
