"""`flaxvision evaluate`: loss, top-1, top-5, per-class accuracy and the confusion matrix of a model on a split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw",
                        help="a run trained with --ema-decay: its raw weights (default) or their EMA")  # fmt: skip
    parser.add_argument("--match-classes", choices=("name", "index"), default="name",
                        help="pair the dataset's classes with the model's by name (default; a class the model does not "
                             "know is an error, a subset is evaluated on its subset) or by position")  # fmt: skip
    parser.add_argument("--tta", choices=("hflip",), default=None, help="average the logits over horizontal flips")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print {accuracy, top5_accuracy, loss, per_class, ...}")
    parser.set_defaults(func=run)


def _run_recipe(source: str) -> Any:
    """The recipe in a run directory's config.json (None when `source` is not a run directory)."""
    from flaxvision.files import read_json
    from flaxvision.train.config import TrainConfig

    path = Path(source) / "config.json"
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except FlaxvisionError:
        return None
    # A model directory has a config.json too (the model's); a run's holds the recipe under "train_config".
    return TrainConfig.from_file(path) if isinstance(record, dict) and "train_config" in record else None


def _generic(names: list[str] | None) -> bool:
    """No real label names: none, or transformers' placeholders LABEL_0, LABEL_1, ..."""
    return not names or all(n == f"LABEL_{i}" for i, n in enumerate(names))


def match_classes(split: Any, model: Any, dataset: str, *, by: str = "name") -> Any:
    """The split with its labels as the model's class indices, matched by name (silent wrong numbers otherwise:
    a cat/bird folder scored by position against a cat/dog model would count every bird as a dog).

    By name: every class of the split must be one of the model's (else one error naming them); a subset is
    evaluated on its subset, its labels remapped to the model's indices. By index, or for a model without real
    label names: the class counts must agree.
    """
    import dataclasses

    import numpy as np

    names = list(model.label_names) if model.label_names else None
    if by == "index" or _generic(names):
        if split.num_classes != model.config.num_classes:
            raise FlaxvisionError(
                f"the model predicts {model.config.num_classes} classes but {dataset!r} has {split.num_classes}; "
                "pass --classes to select the classes the model was trained on"
            )
        return split
    assert names is not None
    unknown = [c for c in split.class_names if c not in names]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        known = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise FlaxvisionError(
            f"{dataset!r} has classes the model does not know: {shown} (the model's {len(names)} classes: {known}); "
            "evaluate on data of the model's classes, or pass --match-classes index to pair classes by position"
        )
    index = np.asarray([names.index(c) for c in split.class_names], np.int64)
    return dataclasses.replace(split, labels=index[split.labels], class_names=tuple(names))


def run(args: argparse.Namespace) -> int:
    from flaxvision.commands.common import class_names_of, load_model
    from flaxvision.train import recipe
    from flaxvision.train.config import TrainConfig
    from flaxvision.train.evaluation import Evaluator

    model = load_model(args.model, weights=args.weights)
    recorded = _run_recipe(args.model)
    if args.dataset is None and recorded is None:
        raise FlaxvisionError(f"{args.model!r} is not a run directory; pass --dataset")
    # The run's own data settings (classes, held-out fraction, seed) unless another dataset is named; --split S
    # evaluates all of S, without it the validation data the run used (or the dataset's default).
    same_data = recorded is not None and args.dataset in (None, recorded.dataset)
    config = recorded if recorded is not None and same_data else TrainConfig(dataset=args.dataset)
    given = {"classes": args.classes, "val_fraction": args.val_fraction, "seed": args.seed}
    config = config.replace(**{k: v for k, v in given.items() if v is not None}, max_train_samples=None,
                            max_val_samples=None, eval_batch_size=args.batch_size, workers=args.workers)  # fmt: skip
    args.dataset = config.dataset
    split = recipe.open_data(config, split=args.split).val
    names = class_names_of(model)
    split = match_classes(split, model, str(args.dataset), by=args.match_classes)
    _, loader = recipe.make_loaders(config.replace(in_memory="off"), model, None, split)  # one pass: stream it
    logits, labels = Evaluator(model, batch_size=args.batch_size).logits(loader, tta=args.tta)
    out = {**summary(logits, labels, list(split.class_names)), "model_class_names": names, "tta": args.tta}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.model} on {args.dataset} ({out['count']} images{', hflip TTA' if args.tta else ''})")
    print(f"  top-1 {out['accuracy']:.4f}   top-5 {out['top5_accuracy']:.4f}   loss (NLL) {out['loss']:.4f}   "
          f"Brier {out['brier']:.4f}")  # fmt: skip
    print(f"  ECE (15 bins) {out['ece']:.4f}; fitted temperature {out['temperature']:.3f}: NLL "
          f"{out['nll_after_temperature']:.4f}, ECE {out['ece_after_temperature']:.4f}")  # fmt: skip
    width = max(max(len(n) for n in out["per_class"]), 9)
    print(f"  {'class':<{width}}  precision  recall      f1  support")
    rows = [(n, m) for n, m in out["per_class_metrics"].items()] + [(k, out[k]) for k in ("macro_avg", "weighted_avg")]
    for name, m in rows:
        support = f"{m['support']:>8}" if "support" in m else f"{out['count']:>8}"
        print(f"  {name:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {support}")
    return 0


def summary(logits: Any, labels: Any, names: list[str]) -> dict[str, Any]:
    """Everything `evaluate` reports, from the logits and labels of the split."""
    import numpy as np

    from flaxvision import metrics

    k = min(5, logits.shape[1])
    top1 = logits.argmax(axis=-1)
    top5 = np.argsort(-logits, axis=-1)[:, :k]
    confusion = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion, (labels, top1), 1)
    support = confusion.sum(axis=1)
    per_class_accuracy = {n: (float(confusion[i, i] / support[i]) if support[i] else None)  # no images: null
                          for i, n in enumerate(names)}  # fmt: skip
    report = metrics.classification_report(confusion, names)
    return {
        "accuracy": float(np.mean(top1 == labels)), "top5_accuracy": float(np.mean((top5 == labels[:, None]).any(-1))),
        "loss": metrics.nll(logits, labels), "count": int(len(labels)), "per_class": per_class_accuracy,
        "per_class_metrics": report["per_class"], "macro_avg": report["macro_avg"],
        "weighted_avg": report["weighted_avg"], **metrics.calibration(logits, labels),
        "confusion_matrix": confusion.tolist(), "class_names": names,
    }  # fmt: skip
