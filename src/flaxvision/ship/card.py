"""The model card (README.md) of a finished run, from its files: config.json, summary.json, eval.json, metrics.jsonl.

    >>> print(model_card("runs/food", layout="transformers", repo_id="me/vit-food20"))

YAML front matter the Hub reads (library_name, pipeline_tag, tags, base_model for a recipe that started from a Hub
checkpoint, datasets for a Hub dataset, model-index with the evaluation: task, dataset and split, top-1, top-5 and
loss), built with huggingface_hub's ModelCardData; then what the model is, how to use it in the chosen layout,
the training data, the recipe, the command that reproduces it, the evaluation, the hardware and time. Every value
comes from the run's files; a missing one reads "not recorded", never a guess. Reads JSON only (no jax, no model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flaxvision import __version__
from flaxvision.errors import FlaxvisionError
from flaxvision.ship.run_files import (
    LAYOUTS,
    NOT_RECORDED,
    RECORDS,
    RECORDS_DIR,
    hub_id,
    model_layout,
    read_run,
    val_split,
)

__all__ = ["LAYOUTS", "RECORDS", "RECORDS_DIR", "front_matter", "model_card", "model_layout", "read_run"]

LIBRARY = {"transformers": "transformers", "timm": "timm", "flaxvision": "flaxvision"}
MAX_LABELS = 20  # labels listed in full up to this many; longer lists are cut
MAX_EPOCH_ROWS = 12
# Recipe fields every card shows; other fields appear when they differ from TrainConfig's defaults.
RECIPE_FIELDS = (
    "model",
    "pretrained",
    "img_size",
    "model_overrides",
    "dtype",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "schedule",
    "warmup_steps",
    "weight_decay",
    "label_smoothing",
    "augment",
    "seed",
)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return NOT_RECORDED
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _metric_rows(evaluation: dict[str, Any] | None) -> list[tuple[str, str, Any]]:
    """(metric type, name, value) of an eval.json, the values as recorded."""
    if not evaluation:
        return []
    rows = [
        ("accuracy", "top-1 accuracy", evaluation.get("val_accuracy")),
        ("top_5_accuracy", "top-5 accuracy", evaluation.get("val_top5_accuracy")),
        ("loss", "cross-entropy loss", evaluation.get("val_loss")),
    ]
    return [r for r in rows if isinstance(r[2], (int, float)) and not isinstance(r[2], bool)]


def front_matter(records: dict[str, Any], *, layout: str, repo_id: str | None, weights: str = "raw") -> str:
    """The card's YAML metadata (without the --- lines), by huggingface_hub's ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    train = records["config"]["train_config"]
    family = records["config"].get("model_config", {}).get("family")
    name = (repo_id or "").split("/")[-1] or train.get("model") or "flaxvision-model"
    dataset = str(train.get("dataset"))
    split = val_split(records)
    evaluation = records["eval_ema" if weights == "ema" else "eval"]
    results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=hub_id(dataset) or dataset,
            dataset_name=dataset,
            dataset_split=split if split != NOT_RECORDED else None,
            metric_type=kind,
            metric_name=label,
            metric_value=value,
        )
        for kind, label, value in _metric_rows(evaluation)
    ]
    tags = [
        "flaxvision",
        "jax",
        "flax",
        "image-classification",
        *([family] if family else []),
        *(["timm"] if layout == "timm" else []),
    ]
    data = ModelCardData(
        library_name=LIBRARY[layout],
        pipeline_tag="image-classification",
        tags=tags,
        base_model=hub_id(train.get("pretrained")),
        datasets=[d] if (d := hub_id(dataset)) else None,
        model_name=name if results else None,
        eval_results=results or None,
    )
    return data.to_yaml()


def _usage(layout: str, repo: str, records: dict[str, Any]) -> str:
    one_channel = records["config"].get("model_config", {}).get("in_chans") == 1
    if layout == "transformers":
        gray = (
            (
                "\n\nThe model was trained on 1-channel (grayscale) images. This export has a 3-channel input layer: the "
                "1-channel kernel times the ITU-R 601 luma weights (0.299, 0.587, 0.114), with the mean and std repeated, "
                "so an RGB image gives what the model computes on its luma (exactly so for gray images)."
            )
            if one_channel
            else ""
        )
        return (
            f'```python\nfrom transformers import pipeline\n\nclassify = pipeline("image-classification", model="{repo}")\n'
            f'print(classify("image.jpg"))\n```{gray}'
        )
    if layout == "timm":
        return (
            f'```python\nimport timm\nfrom PIL import Image\n\nmodel = timm.create_model("hf-hub:{repo}", pretrained=True).eval()\n'
            "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
            'logits = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))\n```'
        )
    return f'```python\nimport flaxvision\n\nmodel = flaxvision.load_pretrained("{repo}")\n```'


def _labels(names: list[str] | None) -> str:
    if not names:
        return NOT_RECORDED
    shown = ", ".join(f"`{n}`" for n in names[:MAX_LABELS])
    return shown + (f", ... ({len(names) - MAX_LABELS} more)" if len(names) > MAX_LABELS else "")


def _value(value: Any) -> str:
    if value is None:
        return "none"
    return f"`{json.dumps(value)}`" if isinstance(value, (dict, list)) else f"`{value}`"


def _recipe(train: dict[str, Any]) -> list[str]:
    from flaxvision.train.config import TrainConfig

    defaults = TrainConfig().to_dict()
    shown = [k for k in RECIPE_FIELDS if k in train]
    shown += [
        k for k in train if k not in RECIPE_FIELDS and train[k] != defaults.get(k) and k not in ("progress", "report")
    ]
    return ["| field | value |", "|---|---|", *(f"| {k} | {_value(train[k])} |" for k in shown)]


def _evaluation(records: dict[str, Any], weights: str) -> list[str]:
    summary, split = records["summary"], val_split(records)
    lines = ["| weights | split | images | top-1 | top-5 | loss |", "|---|---|---|---|---|---|"]
    for kind in ("raw", "ema"):
        ev = records["eval_ema" if kind == "ema" else "eval"]
        if ev:
            mark = " (these weights)" if kind == weights else ""
            lines.append(
                f"| {'EMA' if kind == 'ema' else 'raw'}, final{mark} | {split} | {_num(ev.get('val_count'))} | "
                f"{_num(ev.get('val_accuracy'))} | {_num(ev.get('val_top5_accuracy'))} | {_num(ev.get('val_loss'))} |"
            )
    if len(lines) == 2:
        lines = ["No evaluation was recorded (the run had no validation data)."]
    best, step = summary.get("best_val_accuracy"), summary.get("best_step")
    lines += [
        "",
        f"Best validation top-1 during training: {_num(best)} at step {_num(step)} (chosen by the "
        f"{summary.get('best_by', NOT_RECORDED)} weights); the uploaded weights are the final ones, of step "
        f"{_num(summary.get('steps'))}.",
    ]
    epochs = [r for r in records["metrics"] if r.get("type") == "eval"]
    if epochs:
        cut = epochs[-MAX_EPOCH_ROWS:]
        lines += ["", "| epoch | step | top-1 | top-5 | loss |", "|---|---|---|---|---|"]
        lines += [
            f"| {_num(r.get('epoch'))} | {_num(r.get('step'))} | {_num(r.get('val_accuracy'))} | "
            f"{_num(r.get('val_top5_accuracy'))} | {_num(r.get('val_loss'))} |"
            for r in cut
        ]
        if len(cut) < len(epochs):
            lines.append(
                f"\n(the last {len(cut)} of {len(epochs)} evaluations; all are in {RECORDS_DIR}/metrics.jsonl)"
            )
    return lines


def _reproduce(records: dict[str, Any]) -> list[str]:
    command = records["summary"].get("command")
    changes = records["config"].get("resume_changes")
    lines = ["The command this run was trained with:", "", "```bash", command or NOT_RECORDED, "```"]
    if command and " --resume" in command:
        lines += ["", "(the command that finished a resumed run; the recipe it continued is in config.json)"]
    if changes:
        steps = ", ".join(str(c.get("step")) for c in changes)
        lines += [
            "",
            f"The recipe was changed when the run was resumed (at step {steps}; see config.json's "
            "resume_changes), so no single command reproduces it.",
        ]
    else:
        lines += [
            "",
            f"The same recipe, from the run's config.json (uploaded as {RECORDS_DIR}/config.json by `flaxvision push`):",
            "",
            "```bash",
            f"flaxvision train --from-config {RECORDS_DIR}/config.json",
            "```",
            "",
            "The same recipe on other hardware gives close, not bit-identical, results.",
        ]
    return lines


def _hardware(records: dict[str, Any]) -> list[str]:
    summary, config = records["summary"], records["config"]
    hw = summary.get("hardware") or {}
    seconds = summary.get("wall_seconds")
    rows = [
        ("platform", hw.get("platform")),
        ("device kind", hw.get("device_kind")),
        ("devices", hw.get("device_count", summary.get("devices"))),
        ("processes", hw.get("process_count")),
        ("CPU", hw.get("cpu")),
        ("wall time", f"{seconds:.0f} s ({seconds / 3600:.2f} h)" if isinstance(seconds, (int, float)) else None),
        (
            "compilation",
            f"{summary['compile_seconds']:.1f} s" if isinstance(summary.get("compile_seconds"), (int, float)) else None,
        ),
        (
            "training throughput",
            f"{summary['train_images_per_second']:.0f} images/s"
            if isinstance(summary.get("train_images_per_second"), (int, float))
            else None,
        ),
        ("steps", summary.get("steps")),
        ("epochs", summary.get("epochs")),
        ("JAX", config.get("jax_version")),
    ]
    return ["| | |", "|---|---|", *(f"| {k} | {NOT_RECORDED if v is None else v} |" for k, v in rows)]


def model_card(
    run_dir: str | Path, *, layout: str = "transformers", repo_id: str | None = None, weights: str = "raw"
) -> str:
    """README.md for the model of a finished run: YAML front matter the Hub reads, then the card's sections.

    Args:
      run_dir: a finished `flaxvision train` run directory (config.json and summary.json; eval.json,
        metrics.jsonl and model/ when present).
      layout: the weights' layout in the repo: "transformers", "timm" or "flaxvision" (the usage snippet, library_name).
      repo_id: the Hub repo ("owner/name") the card is for (the snippets' model id); None: a placeholder.
      weights: "raw" or "ema": which final weights the card describes (model-index gets their evaluation).
    """
    if layout not in LAYOUTS:
        raise FlaxvisionError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    records = read_run(run_dir)
    config = records["config"]
    train, model_config = config["train_config"], config.get("model_config", {})
    repo = repo_id or "OWNER/NAME"
    evaluation = records["eval_ema" if weights == "ema" else "eval"] or records["eval"] or {}
    names = config.get("class_names") or evaluation.get("class_names")
    base = train.get("pretrained")
    start = (
        f"fine-tuned from [{hub_id(base)}](https://huggingface.co/{hub_id(base)})"
        if hub_id(base)
        else f"fine-tuned from local weights `{base}`"
        if base
        else "trained from scratch"
    )
    architecture = (records["model"] or {}).get("architectures") or [(records["model"] or {}).get("architecture")]
    per_epoch = config.get("steps_per_epoch")
    seen = (
        per_epoch * train["batch_size"]
        if isinstance(per_epoch, int) and isinstance(train.get("batch_size"), int)
        else None
    )
    top1 = _num(evaluation.get("val_accuracy"))
    sections = [
        f"# {repo.split('/')[-1] if repo_id else train.get('model') or 'flaxvision model'}",
        "",
        f"An image classifier ({model_config.get('family', NOT_RECORDED)} family, `{train.get('model') or NOT_RECORDED}`, "
        f"{model_config.get('img_size', NOT_RECORDED)} px, {model_config.get('in_chans', NOT_RECORDED)}-channel input, "
        f"{len(names) if names else NOT_RECORDED} classes), {start} on `{train.get('dataset')}` with "
        f"flaxvision (JAX + Flax NNX). Validation top-1: {top1} on the {val_split(records)} split. "
        f"Weights: the final {'EMA' if weights == 'ema' else 'raw'} weights, in the {layout} layout"
        + (f" ({', '.join(a for a in architecture if a)})." if any(architecture) else "."),
        "",
        "## How to use",
        "",
        _usage(layout, repo, records),
        "",
        "With flaxvision (any layout):",
        "",
        "```bash",
        f"flaxvision predict {repo} image.jpg --top-k 5",
        "```",
        "",
        "## Training data",
        "",
        f"- dataset: `{train.get('dataset')}`"
        + (
            f" ([Hub](https://huggingface.co/datasets/{hub_id(train.get('dataset'))}))"
            if hub_id(train.get("dataset"))
            else ""
        ),
        f"- training split: `{train.get('train_split') or NOT_RECORDED}`"
        + (f" (capped at {train['max_train_samples']} images)" if train.get("max_train_samples") else "")
        + (
            f"; {seen} images per epoch ({per_epoch} steps x batch {train['batch_size']}; a last partial batch is dropped)"
            if seen
            else ""
        ),
        f"- validation split: {val_split(records)}, {_num(evaluation.get('val_count'))} images"
        + (f" (capped at {train['max_val_samples']})" if train.get("max_val_samples") else ""),
        f"- classes ({len(names) if names else NOT_RECORDED}): {_labels(names)}",
        "",
        "## Training recipe",
        "",
        *_recipe(train),
        "",
        "## Reproduce",
        "",
        *_reproduce(records),
        "",
        "## Evaluation",
        "",
        *_evaluation(records, weights),
        "",
        "## Hardware and time",
        "",
        *_hardware(records),
        "",
        "## Framework",
        "",
        f"Trained with JAX {config.get('jax_version', NOT_RECORDED)}; card written by flaxvision {__version__}.",
        "",
    ]
    return f"---\n{front_matter(records, layout=layout, repo_id=repo_id, weights=weights)}\n---\n\n" + "\n".join(
        sections
    )
