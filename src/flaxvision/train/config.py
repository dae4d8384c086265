"""TrainConfig: everything a run needs, flat so that every field is a command-line override (`--lr 3e-4`).

A preset is a TrainConfig; `config.json` in the run directory is `TrainConfig.to_dict()`, and
`TrainConfig.from_dict(json.load(...))` re-creates the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

from flaxvision.data.autoaugment import parse_randaugment
from flaxvision.errors import ConfigError, did_you_mean
from flaxvision.files import read_json
from flaxvision.models.base import HEAD_INITS
from flaxvision.models.lora import parse_targets as parse_lora_targets

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("linear", "cosine", "constant")
PARAM_SHARDINGS = ("replicated", "fsdp")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # --log-to (flaxvision.train.tracking)
# Fields added after runs were recorded, with the value a recorded run that lacks them had (not today's default).
RECORDED_BEFORE = {"in_memory": "off"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # --- model ---------------------------------------------------------------------------------------------
    model: str | None = "vit_tiny_patch16_224"  # with pretrained: the architecture it must be (None: whatever it is)
    pretrained: str | None = None  # Hub id, directory or file (see flaxvision.load_pretrained)
    img_size: int | None = None  # None: the model's (or checkpoint's) default
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"depth": 6}
    dtype: str = "float32"  # compute dtype; "bfloat16" keeps float32 master weights and float32 loss
    head_init: str = "zeros"  # a replaced pretrained head: "zeros" (ViT transfer recipe) or "random"
    # --- data ----------------------------------------------------------------------------------------------
    dataset: str | None = None  # see flaxvision.data: Hub id, save_to_disk dir, parquet, image folder
    train_split: str = "train"
    val_split: str | None = None  # None: "validation", else "test", else a held-out fraction of train
    val_fraction: float = 0.1  # the stratified held-out fraction when the dataset has no validation split
    classes: str | None = None  # "20" = first 20 class ids, "apple_pie,ramen" = named classes
    image_column: str | None = None  # the dataset's image column (None: detected)
    label_column: str | None = None  # the dataset's label column (None: detected)
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    augment: str = "rrc"  # "rrc" (RandomResizedCrop + flip + colour jitter), "cifar" (pad-crop + flip), "none"
    rrc_scale_min: float = 0.7
    hflip: bool = True
    color_jitter: float = 0.2
    workers: int = 0  # grain worker processes (0: decode in the main process)
    in_memory: str = "auto"  # decode the data once into memory, crop/flip on the device: "auto" (when it fits), "on", "off"
    streaming: bool = False  # parquet files / a Hub dataset read in place, each process its own files (tar shards always are)
    shuffle_buffer: int = 10_000  # sharded data: the training shuffle buffer, in examples (data/shard_order.py)
    in_memory_max_gb: float = 4.0  # the most decoded data (train + val, GB of uint8 pixels) that "auto"/"on" keep
    randaugment: str | None = None  # timm's grammar, e.g. "rand-m9-mstd0.5-inc1" (in the workers, after the crop)
    trivialaugment: bool = False  # TrivialAugment Wide (one op, uniform magnitude; not with randaugment)
    reprob: float = 0.0  # random erasing probability per image (timm's --reprob), in the workers
    remode: str = "pixel"  # random erasing fill: "pixel" (per-pixel normal noise), "rand" (per-channel), "const" (0)
    recount: int = 1  # random erasing: up to this many boxes per image
    mixup: float = 0.0  # mixup alpha (0: off), on the device inside the step, soft targets
    cutmix: float = 0.0  # CutMix alpha (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch (or an example, with mixup_mode "elem")
    mixup_switch_prob: float = 0.5  # with both mixup and cutmix on: probability of CutMix instead of mixup
    mixup_mode: str = "batch"  # "batch" (one lambda and box per batch) or "elem" (one per example)
    mixup_off_epoch: int | None = None  # mix only the first E epochs (timm's --mixup-off-epoch)
    # --- optimisation --------------------------------------------------------------------------------------
    epochs: int = 3
    batch_size: int = 32  # global batch; must divide by the device count
    eval_batch_size: int | None = None  # None: 2 x batch_size
    optimizer: str = "sgd"
    lr: float = 1e-3
    schedule: str = "linear"  # after warmup: "linear" decay to end_lr, "cosine" decay, or "constant"
    warmup_steps: int = 0
    end_lr: float = 0.0
    momentum: float = 0.9  # SGD
    nesterov: bool = False  # SGD
    b1: float = 0.9  # AdamW
    b2: float = 0.999  # AdamW
    weight_decay: float = 0.0  # AdamW, decoupled; never on biases, norms, position embeddings, CLS token
    clip_grad_norm: float | None = None
    accumulate_steps: int = 1  # split each batch into this many micro-batches (same update, less memory)
    steps_per_dispatch: int | None = None  # K steps per device call (lax.scan; same results); None: chosen by model size
    label_smoothing: float = 0.0
    layer_decay: float | None = None  # ViT layer-wise learning-rate decay, e.g. 0.75
    ema_decay: float | None = None  # EMA of the weights (timm ModelEmaV3), e.g. 0.9998; evaluated beside the raw
    ema_warmup: bool = False  # EMA decay warmup: 1 - (1 + step) ** -2/3, capped at ema_decay
    best_by: str = "raw"  # which weights choose the best checkpoint: "raw" or "ema" (needs ema_decay)
    # --- LoRA (low-rank adapters; the base weights are frozen: only adapters and the head train) ---------------
    lora_rank: int | None = None  # e.g. 16 (None: no LoRA)
    lora_alpha: float | None = None  # scale alpha / rank (None: alpha = rank)
    lora_targets: str = "qkv"  # comma list of qkv, q, k, v (parts of the fused qkv), proj, fc1, fc2
    lora_dropout: float = 0.0  # dropout on the adapter's input
    # --- sharding (see docs/DISTRIBUTED.md) ------------------------------------------------------------------
    param_sharding: str = "replicated"  # "fsdp": shard big parameters + optimizer state over the data axis
    fsdp_min_size: int = 2**18  # with fsdp: arrays with fewer elements stay replicated (biases, norms, ...)
    # --- freezing ------------------------------------------------------------------------------------------
    train_only: str | None = None  # None (train all), "head", "last:K" (last K blocks + final norm + head)
    freeze: str | None = None  # regex on parameter paths ("blocks.0.attn.qkv.kernel"): matches are frozen
    # --- run -----------------------------------------------------------------------------------------------
    seed: int = 0
    log_every: int = 10  # read metrics from the device every N steps (never every step)
    eval_every: int | None = None  # also evaluate every N steps (always at each epoch end)
    checkpoint_every: int | None = None  # also checkpoint every N steps (always at each epoch end)
    keep_checkpoints: int = 2  # the last K are kept, plus the best by val top-1
    progress: bool = True  # tqdm bar per epoch
    report: bool = True  # plots + report.html in the run directory at the end
    profile: str | None = None  # "START:COUNT": a jax.profiler trace of COUNT steps after START steps, in <run>/profile
    log_to: str | None = None  # also log to experiment trackers: "tensorboard", "wandb", "mlflow", comma-separated

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"{field}={getattr(self, field)!r}: {why}")

        if self.model is None and self.pretrained is None:
            raise ConfigError("model=None needs pretrained= (the checkpoint then decides the architecture)")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"use one of {', '.join(SCHEDULES)}")
        if self.augment not in ("rrc", "cifar", "none"):
            raise bad("augment", "use rrc, cifar or none")
        if self.param_sharding not in PARAM_SHARDINGS:
            raise bad("param_sharding", f"use one of {', '.join(PARAM_SHARDINGS)}")
        if self.fsdp_min_size < 1:
            raise bad("fsdp_min_size", "must be >= 1")
        if self.head_init not in HEAD_INITS:
            raise bad("head_init", f"use one of {', '.join(HEAD_INITS)}")
        for field in ("epochs", "batch_size", "accumulate_steps", "log_every", "keep_checkpoints"):
            if getattr(self, field) < 1:
                raise bad(field, "must be >= 1")
        if self.batch_size % self.accumulate_steps:
            raise bad("accumulate_steps", f"must divide batch_size {self.batch_size}")
        for field, value in dataclasses.asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(field, "must be a finite number")
        if self.lr <= 0:
            raise bad("lr", "must be > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise bad("label_smoothing", "must be in [0, 1)")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise bad("layer_decay", "must be in (0, 1]")
        if self.train_only is not None and not (self.train_only == "head" or _last_k(self.train_only) is not None):
            raise bad("train_only", 'use "head" or "last:K" (e.g. last:2)')
        if not 0.1 <= self.rrc_scale_min <= 1.0:
            raise bad("rrc_scale_min", "must be in [0.1, 1]")
        if self.shuffle_buffer < 1:
            raise bad("shuffle_buffer", "must be >= 1 (1: no shuffling within a process's shards)")
        if self.in_memory not in ("auto", "on", "off"):
            raise bad("in_memory", "use auto, on or off")
        if self.in_memory_max_gb <= 0:
            raise bad("in_memory_max_gb", "must be > 0, e.g. 4")
        if self.steps_per_dispatch is not None and not 1 <= self.steps_per_dispatch <= 1024:
            raise bad("steps_per_dispatch", "must be in [1, 1024] (1: one step per call), or None to choose by model size")
        if self.profile is not None and profile_window(self.profile) is None:
            raise bad("profile", "use START:COUNT, e.g. 10:5 (trace 5 steps after the first 10)")
        if self.log_to is not None:
            log_to_names(self.log_to)  # a one-line ConfigError naming the bad tracker
        self._check_recipe_options(bad)

    def _check_recipe_options(self, bad: Any) -> None:
        """EMA, mixup/CutMix, host augmentation and LoRA options."""
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise bad("ema_decay", "must be in (0, 1), e.g. 0.9998")
        if self.best_by not in ("raw", "ema"):
            raise bad("best_by", "use raw or ema")
        if self.best_by == "ema" and self.ema_decay is None:
            raise bad("best_by", "needs --ema-decay (there are no EMA weights to choose by)")
        if self.ema_warmup and self.ema_decay is None:
            raise bad("ema_warmup", "needs --ema-decay")
        for field in ("mixup", "cutmix"):
            if getattr(self, field) < 0:
                raise bad(field, "must be >= 0 (0 turns it off), e.g. 0.8")
        for field in ("mixup_prob", "mixup_switch_prob", "reprob"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise bad(field, "must be in [0, 1]")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "must be in [0, 1)")
        if self.mixup_mode not in ("batch", "elem"):
            raise bad("mixup_mode", "use batch or elem")
        if self.mixup_off_epoch is not None and self.mixup_off_epoch < 0:
            raise bad("mixup_off_epoch", "must be >= 0")
        if self.remode not in ("pixel", "rand", "const"):
            raise bad("remode", "use pixel, rand or const")
        if self.recount < 1:
            raise bad("recount", "must be >= 1")
        if self.randaugment is not None:
            parse_randaugment(self.randaugment)  # a one-line ConfigError naming the bad option
        if self.randaugment is not None and self.trivialaugment:
            raise bad("trivialaugment", "choose one of --randaugment and --trivialaugment")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise bad("lora_rank", "must be >= 1, e.g. 16")
        if self.lora_alpha is not None and (self.lora_rank is None or self.lora_alpha <= 0):
            raise bad("lora_alpha", "must be > 0 and goes with --lora-rank")
        try:
            parse_lora_targets(self.lora_targets)
        except ConfigError as err:
            raise bad("lora_targets", str(err)) from None
        for field, default in (("lora_targets", "qkv"), ("lora_dropout", 0.0)):
            if self.lora_rank is None and getattr(self, field) != default:
                raise bad(field, "goes with --lora-rank (without it there are no adapters)")
        if self.lora_rank is not None and self.train_only is not None:
            raise bad("train_only", "LoRA already trains only the adapters and the head; drop --train-only "
                      "(--freeze still applies on top)")  # fmt: skip

    @property
    def mixes(self) -> bool:
        """Whether mixup or CutMix is on (then the step trains on soft targets)."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def global_eval_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    def replace(self, **changes: Any) -> TrainConfig:
        unknown = sorted(set(changes) - set(field_types()))
        if unknown:
            raise ConfigError(f"unknown training option {unknown[0]!r}{did_you_mean(unknown[0], field_types())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls().replace(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """The recipe in a run's config.json (its "train_config") or in a JSON file of TrainConfig fields."""
        record = read_json(path)
        if not isinstance(record, dict):
            raise ConfigError(f"{path} holds no recipe ({'no such file' if record is None else 'not a JSON object'}); "
                              "pass a run's config.json")  # fmt: skip
        recipe = record.get("train_config", record)
        if not isinstance(recipe, dict):
            raise ConfigError(f"{path}: train_config is not a JSON object; pass a run's config.json")
        if "train_config" in record:  # a run's record: it ran with what the fields it lacks meant then
            recipe = {**RECORDED_BEFORE, **recipe}
        return cls.from_dict(recipe)


def log_to_names(value: str | None) -> tuple[str, ...]:
    """"tensorboard,mlflow" -> ("tensorboard", "mlflow"): the trackers named (a name twice counts once), checked."""
    names = [n.strip() for n in (value or "").split(",")]
    if value is not None and not any(names):
        raise ConfigError(f"log_to={value!r}: name one or more of {', '.join(TRACKERS)} (comma-separated), or none")
    for name in names:
        if name and name not in TRACKERS:
            raise ConfigError(f"log_to={value!r}: unknown tracker {name!r}{did_you_mean(name, TRACKERS)}; use any of "
                              f"{', '.join(TRACKERS)}, comma-separated (e.g. tensorboard,wandb)")  # fmt: skip
    return tuple(dict.fromkeys(n for n in names if n))


def profile_window(value: str) -> tuple[int, int] | None:
    """"START:COUNT" -> (START, COUNT) with START >= 0 and COUNT >= 1, else None."""
    start, sep, count = value.partition(":")
    if sep and start.isdigit() and count.isdigit() and int(count) >= 1:
        return int(start), int(count)
    return None


def _last_k(value: str) -> int | None:
    if value.startswith("last:") and value[5:].isdigit() and int(value[5:]) >= 1:
        return int(value[5:])
    return None


def field_types() -> dict[str, Any]:
    """Field name -> the plain type a command-line value is parsed to (int, float, str, bool, dict)."""
    hints = typing.get_type_hints(TrainConfig)
    result = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            hint = args[0]
        result[name] = typing.get_origin(hint) or hint
    return result
