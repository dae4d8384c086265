"""`flaxvision evaluate` pairs the dataset's classes with the model's by name, never silently by position."""

import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

import flaxvision
from flaxvision.weights import save_pretrained
from tests.helpers import run_cli


def _folder(root, classes, per_class=3):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / "validation" / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "validation" / name / f"{i}.png")
    return root


def _model_dir(tmp_path, names):
    model = flaxvision.create_model("cnn", num_classes=len(names), img_size=16, in_chans=3)
    model.label_names = tuple(names)
    return save_pretrained(model, tmp_path / "model"), model


def test_a_class_the_model_does_not_know_is_an_error_naming_it(tmp_path, capsys):
    model_dir, _ = _model_dir(tmp_path, ["cat", "dog"])
    data = _folder(tmp_path / "data", ["bird", "cat"])
    code, out, err = run_cli(["evaluate", model_dir, "--dataset", data, "--split", "validation"], capsys)
    assert code == 2 and out == ""
    assert err.strip().startswith(f"flaxvision: error: {str(data)!r} has classes the model does not know: 'bird' "
                                  "(the model's 2 classes: cat, dog)")  # fmt: skip
    code, out, _ = run_cli(["evaluate", model_dir, "--dataset", data, "--split", "validation", "--match-classes",
                            "index", "--json"], capsys)  # fmt: skip
    assert code == 0 and json.loads(out)["count"] == 6  # by position, when asked for


def test_classes_in_another_order_or_a_subset_are_matched_by_name(tmp_path, capsys):
    model_dir, model = _model_dir(tmp_path, ["zebra", "cat", "dog"])
    data = _folder(tmp_path / "data", ["cat", "zebra"])  # sorted: cat=0, zebra=1; the model: zebra=0, cat=1
    code, out, _ = run_cli(["evaluate", model_dir, "--dataset", data, "--split", "validation", "--json"], capsys)
    assert code == 0, out
    result = json.loads(out)
    assert result["class_names"] == ["zebra", "cat", "dog"] and result["count"] == 6
    assert result["per_class"]["dog"] is None  # no images of it: null, not NaN
    confusion = np.asarray(result["confusion_matrix"])
    assert confusion.sum(axis=1).tolist() == [3, 3, 0]  # 3 zebras in the zebra row, 3 cats in the cat row

    # The same predictions, computed here: the reported top-1 is the share of images whose argmax is their class.
    from flaxvision.data.transforms import decode_eval
    from flaxvision.train import TrainConfig
    from flaxvision.train.recipe import open_data

    split = open_data(TrainConfig(dataset=str(data)), split="validation").val
    pixels = np.stack([decode_eval(split[i]["image"], model.preprocessing) for i in range(len(split))])
    logits = np.asarray(model(flaxvision.data.device_preprocess(pixels, model.preprocessing.mean, model.preprocessing.std)))
    truth = np.asarray([["zebra", "cat", "dog"].index(split.class_names[label]) for label in split.labels])
    assert result["accuracy"] == float(np.mean(logits.argmax(-1) == truth))


def test_evaluate_reports_per_class_metrics_calibration_and_flip_averaged_logits(tmp_path, capsys):
    from sklearn.metrics import classification_report

    sk_report: Any = classification_report  # (its stubs type the dict output loosely)

    from flaxvision import metrics
    from flaxvision.data.transforms import decode_eval
    from flaxvision.train import TrainConfig
    from flaxvision.train.recipe import open_data

    model_dir, model = _model_dir(tmp_path, ["a", "b", "c"])
    data = _folder(tmp_path / "data", ["a", "b", "c"], per_class=4)
    split = open_data(TrainConfig(dataset=str(data)), split="validation").val
    pixels = np.stack([decode_eval(split[i]["image"], model.preprocessing) for i in range(len(split))])
    x = flaxvision.data.device_preprocess(pixels, model.preprocessing.mean, model.preprocessing.std)
    plain = np.asarray(model(x), np.float64)
    flipped = (plain + np.asarray(model(x[:, :, ::-1, :]), np.float64)) / 2
    truth = np.asarray(split.labels)
    for tta, logits in ((None, plain), ("hflip", flipped)):
        argv = ["evaluate", model_dir, "--dataset", data, "--split", "validation", "--json"] + (["--tta", tta] if tta else [])
        code, out, _ = run_cli(argv, capsys)
        assert code == 0, out
        result = json.loads(out)
        assert result["tta"] == tta and result["accuracy"] == float(np.mean(logits.argmax(-1) == truth))
        want = metrics.calibration(logits, truth)
        for key in ("nll", "ece", "brier", "temperature", "nll_after_temperature"):
            assert result[key] == pytest.approx(want.get(key, metrics.brier_score(metrics.softmax(logits), truth)), rel=1e-3, abs=1e-5), key
        present = sorted(set(truth) | set(logits.argmax(-1)))
        theirs = sk_report(truth, logits.argmax(-1), labels=present, target_names=[split.class_names[i] for i in present],
                           output_dict=True, zero_division=0)  # fmt: skip
        for i in present:
            name = split.class_names[i]
            assert result["per_class_metrics"][name]["f1"] == pytest.approx(theirs[name]["f1-score"]), name
        assert result["macro_avg"]["f1"] == pytest.approx(theirs["macro avg"]["f1-score"])
