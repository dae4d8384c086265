"""A recipe (TrainConfig) -> the parts of a run: the model, the data loaders, the on-device augmentation.

`fit`, `flaxvision report` and `flaxvision evaluate` build their model and data here, so a run, its report and its
evaluation see the same classes, the same preprocessing and the same images.

    parts = build_run(config)                      # opens config.dataset, builds config.model for its classes
    parts.train, parts.val, parts.model, parts.class_names, parts.jitter
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from flaxvision import files
from flaxvision.errors import ConfigError, FlaxvisionError
from flaxvision.host_memory import memory_limit_bytes
from flaxvision.train.config import TrainConfig


@dataclasses.dataclass
class RunParts:
    model: Any
    train: Any  # a flaxvision.data Loader (this process's slice of every global batch)
    val: Any
    class_names: list[str]
    jitter: Any  # the AugmentConfig whose colour jitter the device stage applies (None: none)


def augment_config(config: TrainConfig) -> Any:
    """The training AugmentConfig of a recipe. RandAugment / TrivialAugment and random erasing apply whenever given,
    with every `augment` crop mode ("none" included: the eval geometry, then those)."""
    from flaxvision import data

    host: dict[str, Any] = dict(randaugment=config.randaugment, trivialaugment=config.trivialaugment,
                                reprob=config.reprob, remode=config.remode, recount=config.recount)  # fmt: skip
    if config.augment == "rrc":
        return data.AugmentConfig(scale=(config.rrc_scale_min, 1.0), hflip=config.hflip, brightness=config.color_jitter,
                                  contrast=config.color_jitter, saturation=config.color_jitter, **host)  # fmt: skip
    if config.augment == "cifar":
        return data.AugmentConfig(crop="pad_crop", hflip=config.hflip, brightness=0.0, contrast=0.0, saturation=0.0,
                                  **host)  # fmt: skip
    return data.AugmentConfig(crop="resize", hflip=False, brightness=0.0, contrast=0.0, saturation=0.0, **host)


def build_model(config: TrainConfig, *, num_classes: int | None, in_chans: int | None = None) -> Any:
    """`config.model` (pretrained from `config.pretrained`) for `num_classes` classes, with the recipe's LoRA adapters."""
    from flaxvision.models import create_model

    kwargs = dict(num_classes=num_classes, img_size=config.img_size, dtype=config.dtype, seed=config.seed)
    if config.pretrained:
        model = create_model(config.model, pretrained=config.pretrained, head_init=config.head_init, **kwargs,
                             **config.model_overrides)  # fmt: skip
    else:
        model = create_model(config.model, in_chans=in_chans, **kwargs, **config.model_overrides)
    return with_lora(config, model)


def with_lora(config: TrainConfig, model: Any) -> Any:
    """The model as the recipe trains it: LoRA adapters added (in place) with --lora-rank, unless it carries them
    already, in which case they must be the recipe's; a model with adapters needs --lora-rank."""
    from flaxvision.models import lora

    have = lora.lora_spec(model)
    if config.lora_rank is None:
        if have is not None:
            raise ConfigError(f"the model carries LoRA adapters ({have.describe()}) but the recipe has no --lora-rank; "
                              f"pass --lora-rank {have.rank} --lora-targets {','.join(have.targets)}, or merge_lora(model) first")  # fmt: skip
        return model
    want = lora.LoRASpec(config.lora_rank, float(config.lora_alpha or config.lora_rank),
                         lora.parse_targets(config.lora_targets), config.lora_dropout)  # fmt: skip
    if have is None:
        return lora.apply_lora(model, rank=want.rank, alpha=want.alpha, targets=want.targets, dropout=want.dropout,
                               seed=config.seed)  # fmt: skip
    if have != want:
        raise ConfigError(f"the model's LoRA adapters ({have.describe()}) differ from the recipe's ({want.describe()}); "
                          "pass the recipe they were made with, or merge_lora(model) first")  # fmt: skip
    return model


def open_data(config: TrainConfig, *, split: str | None = None) -> Any:
    """The dataset of a recipe (train and validation splits, class names); `split` evaluates all of that split."""
    from flaxvision import data

    if not config.dataset:
        raise ConfigError("no dataset given: pass --dataset (a Hub id, a save_to_disk directory, parquet files or an image folder)")
    classes: Any = config.classes
    if isinstance(classes, str) and classes.isdigit():
        classes = int(classes)
    return data.load(
        config.dataset, train_split=split or config.train_split, val_split=split or config.val_split, classes=classes,
        max_train_samples=config.max_train_samples, max_val_samples=config.max_val_samples,
        val_fraction=config.val_fraction, seed=config.seed, image_column=config.image_column,
        label_column=config.label_column, streaming=config.streaming,
    )  # fmt: skip


def check_class_count(model: Any, count: int) -> None:
    """Labels beyond the head would train silently wrong: the data's class count must be the model's."""
    if count != model.config.num_classes:
        raise FlaxvisionError(
            f"the data has {count} classes but the model predicts {model.config.num_classes}; "
            "build the model with num_classes matching the data"
        )


def _process_share() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def make_loaders(config: TrainConfig, model: Any, train_source: Any, val_source: Any, *,
                 announce: bool = False) -> tuple[Any, Any]:  # fmt: skip
    """(train loader or None, val loader) for a model: each process reads only its slice of every global batch.
    `announce`: say (on stderr) how data kept in memory was decoded (training does; evaluate and report do not)."""
    from flaxvision import data

    index, count = _process_share()
    common: dict[str, Any] = dict(preprocessing=model.preprocessing, seed=config.seed, workers=config.workers,
                                  shard_index=index, shard_count=count)  # fmt: skip
    streamed: dict[str, Any] = dict(shuffle_buffer=config.shuffle_buffer)
    if in_memory_reason(config, model, train_source, val_source) is None:
        from flaxvision.data import in_memory

        quiet: dict[str, Any] = dict(progress=announce and index == 0)
        train_loader = None
        if train_source is not None:
            train_loader = in_memory.load(train_source, batch_size=config.batch_size // count, train=True,
                                          augment=augment_config(config), **common, **quiet)  # fmt: skip
        val = in_memory.load(val_source, batch_size=config.global_eval_batch_size // count, train=False, **common, **quiet)
        return train_loader, val
    train_loader = None
    if train_source is not None:
        train_loader = data.make_loader(train_source, batch_size=config.batch_size // count, train=True,
                                        augment=augment_config(config), **common, **streamed)  # fmt: skip
    val_loader = data.make_loader(val_source, batch_size=config.global_eval_batch_size // count, train=False, **common,
                                  **streamed)  # fmt: skip
    return train_loader, val_loader


def in_memory_reason(config: TrainConfig, model: Any, train_source: Any, val_source: Any) -> str | None:
    """None when the recipe's data is to be decoded into memory (data.in_memory), else why it streams.

    --in-memory off streams; "on" insists (an error when it cannot be done); "auto" keeps the data in memory when
    it fits under --in-memory-max-gb (and half the machine's memory) and the device can do all of the augmentation.
    """
    from flaxvision.data import in_memory

    if config.in_memory == "off":
        return "--in-memory off"
    sources = [s for s in (train_source, val_source) if s is not None]
    sharded = next((s for s in sources if getattr(s.images, "streaming", False)), None)
    if sharded is not None:  # every process would read every shard
        if config.in_memory == "on":
            raise ConfigError(f"--in-memory on: {sharded.name} is sharded, and each process streams only its own "
                              "shards; use --in-memory auto or off")  # fmt: skip
        return f"{sharded.name} is sharded: each process streams its own shards"
    augment = augment_config(config) if train_source is not None else None
    reason = in_memory.host_only_reason(train_source, model.preprocessing, augment) if train_source is not None else None
    too_big = in_memory.check_fits(sources, model.preprocessing, config.in_memory_max_gb)
    if config.in_memory == "on" and (reason or too_big):
        raise ConfigError(f"--in-memory on: {reason or too_big}; use --in-memory auto or off (streams from storage)"
                          + ("" if reason else " or raise --in-memory-max-gb"))  # fmt: skip
    if too_big and not reason and _process_share()[0] == 0:
        print(f"flaxvision: streaming the data from storage: {too_big}", file=sys.stderr)
    return reason or too_big


def build_run(config: TrainConfig, model: Any = None) -> RunParts:
    """Open `config.dataset` and build the model (unless given) and the loaders."""
    splits = open_data(config)
    class_names = list(splits.class_names)
    if model is None:
        model = build_model(config, num_classes=len(class_names), in_chans=splits.train.num_channels)
    check_class_count(model, len(class_names))
    train, val = make_loaders(config, model, splits.train, splits.val, announce=config.progress)
    return RunParts(model=model, train=train, val=val, class_names=class_names, jitter=augment_config(config))


# ---- will it fit? ------------------------------------------------------------------------------------------------


def check_fits(config: TrainConfig, model: Any, devices: list[Any]) -> None:
    """Fail in a second, with the estimate and a fix, when one device cannot hold a training step."""
    estimate = getattr(model.config, "train_memory_bytes", None)
    if estimate is None or not devices:
        return
    per_device = max(1, config.batch_size // len(devices) // config.accumulate_steps)
    slots = 2 if config.optimizer == "adamw" else 1
    need = int(estimate(per_device, optimizer_slots=slots))
    if config.lora_rank is not None:  # the frozen base has no gradients, updates or moments (the adapters: ~nothing)
        need -= 4 * model.config.param_count() * (2 + slots)
    # CPU "devices" are one machine: they share its memory.
    total = need * len(devices) if devices[0].platform == "cpu" else need
    limit = memory_limit_bytes(devices[0])
    if limit is None or total <= limit[0]:
        return
    gb = lambda b: f"{b / 1e9:.1f} GB"
    fits = max(1, int(per_device * limit[0] / total * 0.8))
    raise ConfigError(
        f"this configuration needs about {gb(total)} to train at batch size {config.batch_size} (an estimate) but "
        f"{limit[1]} is {gb(limit[0])}; lower --batch-size (about "
        f"{fits * len(devices)} fits) or add --accumulate-steps {2 * config.accumulate_steps}, or a smaller "
        "--img-size / a larger patch"
    )


# ---- a finished run's parts, rebuilt for its report ------------------------------------------------------------


def report_inputs(run_dir: Any) -> dict[str, Any]:
    """What `report.write_report` draws from, rebuilt from a run directory's config.json and model/: the model, the
    loaders, the device stage (with the recipe's jitter) and the schedule; what cannot be rebuilt becomes a note."""
    from pathlib import Path

    import jax

    from flaxvision.data.device import DeviceStage
    from flaxvision.train.optim import learning_rate_schedule

    run_dir = Path(run_dir)
    out: dict[str, Any] = {"notes": []}
    try:
        record = files.read_json(run_dir / "config.json") or {}
        config = TrainConfig.from_file(run_dir / "config.json")
    except FlaxvisionError as err:
        out["notes"].append(f"schedule and sample grids left out: the run's config.json could not be read ({err})")
        return out
    out["schedule"] = learning_rate_schedule(config, int(record.get("total_steps", 1)))
    if (run_dir / "model").is_dir():
        try:
            from flaxvision.weights import load_pretrained

            out["model"] = load_pretrained(run_dir / "model")
        except (ImportError, FlaxvisionError) as err:
            out["notes"].append(f"prediction grid left out: the exported model could not be loaded ({err})")
    model = out.get("model")
    if model is None:
        return out
    try:
        splits = open_data(config)
        # (streamed: the report draws a few samples, not worth decoding the whole dataset)
        out["train_data"], out["val_data"] = make_loaders(config.replace(workers=0, in_memory="off"), model, splits.train,
                                                          splits.val)  # fmt: skip
    except FlaxvisionError as err:
        out["notes"].append(f"sample grids left out: the dataset could not be opened ({err})")
    out["stage"] = DeviceStage(model.preprocessing, devices=jax.devices()[:1], jitter=augment_config(config),
                               dtype=model.config.dtype)  # fmt: skip
    return out
