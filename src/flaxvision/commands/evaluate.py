"""`flaxvision evaluate`: loss, top-1, top-5, per-class accuracy and the confusion matrix of a model on a split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flaxvision.errors import FlaxvisionError

EPILOG = """examples:
  flaxvision evaluate runs/digits-vit-20261122-101500                  # the run's own validation data
  flaxvision evaluate runs/food --dataset ethz/food101 --split validation --classes 20 --json
  flaxvision evaluate google/vit-base-patch16-224 --dataset ./imagenet_val_folder --split val"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "evaluate", help="evaluate a trained model on a dataset split", epilog=EPILOG,
        description="Loss, top-1, top-5, per-class accuracy and confusion matrix of a model on one split.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("model", metavar="RUN_OR_MODEL_DIR", help="a run directory, a model directory or a Hub id")
    parser.add_argument("--dataset", help="Hub id, save_to_disk dir, parquet, image folder, builtin:digits "
                        "(default for a run directory: the run's own validation data)")
    parser.add_argument("--split", default=None, help="the split to evaluate (default: validation, else test, else "
                        "the held-out fraction of train)")
    parser.add_argument("--classes", default=None, help="the class subset the model was trained on (e.g. 20)")
    parser.add_argument("--val-fraction", type=float, default=None, help="held-out fraction when there is no split")
    parser.add_argument("--seed", type=int, default=None, help="seed of the held-out fraction")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print {accuracy, top5_accuracy, loss, per_class, ...}")
    parser.set_defaults(func=run)


def _run_data_settings(source: str) -> dict:
    """The data settings recorded in a run directory's config.json ({} when it is not a run directory)."""
    path = Path(source) / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text()).get("train_config", {})
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: config.get(k) for k in ("dataset", "train_split", "val_split", "classes", "val_fraction", "seed")}


def run(args: argparse.Namespace) -> int:
    from flaxvision import data
    from flaxvision.commands.common import class_names_of, load_model
    from flaxvision.train.loop import Evaluator

    model = load_model(args.model)
    # --split S evaluates all of S; without it, the validation data the run used (or the dataset's default).
    settings = {"dataset": args.dataset, "train_split": args.split, "val_split": args.split, "classes": args.classes,
                "val_fraction": args.val_fraction, "seed": args.seed}  # fmt: skip
    recorded = _run_data_settings(args.model)
    if args.dataset is None and not recorded:
        raise FlaxvisionError(f"{args.model!r} is not a run directory; pass --dataset")
    if args.dataset is None or args.dataset == recorded.get("dataset"):
        settings = {k: v if v is not None else recorded.get(k) for k, v in settings.items()}  # same data as the run
    classes = settings["classes"]
    classes = int(classes) if isinstance(classes, str) and classes.isdigit() else classes
    split = data.load(settings["dataset"], train_split=settings["train_split"], val_split=settings["val_split"],
                      classes=classes, val_fraction=settings["val_fraction"] or 0.1, seed=settings["seed"] or 0).val  # fmt: skip
    args.dataset = settings["dataset"]
    names = class_names_of(model)
    if split.num_classes != model.config.num_classes:
        raise FlaxvisionError(
            f"the model predicts {model.config.num_classes} classes but {args.dataset!r} has {split.num_classes}; "
            "pass --classes to select the classes the model was trained on"
        )
    loader = data.make_loader(split, preprocessing=model.preprocessing, batch_size=args.batch_size, train=False,
                              workers=args.workers, to_device=False)  # fmt: skip
    result = Evaluator(model, batch_size=args.batch_size).evaluate(loader)
    per_class = {name: acc for name, acc in zip(split.class_names, result["per_class_accuracy"])}
    out = {
        "accuracy": result["val_accuracy"], "top5_accuracy": result["val_top5_accuracy"], "loss": result["val_loss"],
        "count": result["val_count"], "per_class": per_class, "confusion_matrix": result["confusion"],
        "class_names": list(split.class_names), "model_class_names": names,
    }  # fmt: skip
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.model} on {args.dataset} ({result['val_count']} images)")
    print(f"  top-1 {out['accuracy']:.4f}   top-5 {out['top5_accuracy']:.4f}   loss {out['loss']:.4f}")
    width = max(len(n) for n in per_class)
    for name, acc in per_class.items():
        print(f"  {name:<{width}}  {acc:.4f}" if acc == acc else f"  {name:<{width}}  (no images)")
    return 0
