"""The run report's analysis (per-class table, reliability diagram, confident mistakes, explanations), the compare
page, and both pages opened in a real headless Chromium."""

from __future__ import annotations

import html.parser
import json
import os
import shutil

import numpy as np
import pytest

from tests.helpers import (
    CLASS_NAMES,
    assert_unchanged,
    batches,
    colour_data,
    colour_fit_kwargs,
    error_lines,
    run_cli,
    small_config,
    snapshot,
)


class Page(html.parser.HTMLParser):
    """The tables (rows of cell texts) and the images of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[dict[str, str | None]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def table_with(self, header: str) -> list[list[str]]:
        return next(t for t in self.tables if t and t[0] and t[0][0] == header)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs that differ in their learning rate (one epoch of colour data each, 4 steps), with
    reports."""
    from flaxvision.train import fit

    root = tmp_path_factory.mktemp("runs")
    out = []
    for name, lr in (("fast", 3e-3), ("slow", 1e-4)):
        fit(small_config(report=True, epochs=1, lr=lr), run_dir=root / name, **colour_fit_kwargs())
        out.append(root / name)
    return out


def test_report_has_per_class_table_calibration_mistakes_and_explanations(runs):
    from flaxvision import metrics

    run = runs[1]  # the slow run: it still makes mistakes
    page = Page((run / "report.html").read_text())
    shown = {img.get("data-file") for img in page.images}
    assert {"reliability.png", "explanations.png", "confusion_matrix.png"} <= shown
    assert all((img.get("src") or "").startswith("data:image/png;base64,") for img in page.images)
    # The per-class table is the final evaluation's, lowest F1 first.
    evaluation = json.loads((run / "eval.json").read_text())
    expected = metrics.classification_report(np.asarray(evaluation["confusion"]), CLASS_NAMES)["per_class"]
    rows = page.table_with("class")[1:]
    assert sorted(r[0] for r in rows) == sorted(CLASS_NAMES)
    for name, precision, recall, f1, support in rows:
        want = expected[name]
        assert (float(precision), float(recall), float(f1), int(support)) == pytest.approx(
            (want["precision"], want["recall"], want["f1"], want["support"]), abs=6e-5)
    f1s = [float(r[3]) for r in rows]
    assert f1s == sorted(f1s)
    # The calibration table holds the metrics of the model's logits on the validation data.
    from flaxvision.train.evaluation import Evaluator
    from flaxvision.weights import load_pretrained

    model = load_pretrained(run / "model")
    xv, yv = colour_data(32, 1)
    logits, labels = Evaluator(model, batch_size=16).logits(batches(xv, yv, 16))
    values = {r[0]: r[1] for r in page.tables[_calibration_index(page)][1:]}
    assert int(values["images"]) == 32
    assert float(values["ECE (15 bins)"]) == pytest.approx(metrics.expected_calibration_error(metrics.softmax(logits), labels), abs=2e-4)
    assert float(values["NLL"]) == pytest.approx(metrics.nll(logits, labels), abs=2e-4)
    wrong = int((logits.argmax(-1) != labels).sum())
    assert ("mistakes.png" in shown) == (wrong > 0)


def _calibration_index(page: Page) -> int:
    return next(i for i, t in enumerate(page.tables) if any(row and row[0] == "fitted softmax temperature" for row in t))


def test_validation_pass_keeps_the_most_confident_mistakes_with_their_images():
    from flaxvision.data.device import DeviceStage
    from flaxvision.report.analysis import validation_pass
    from tests.helpers import tiny_vit

    model = tiny_vit(seed=3)
    x, y = colour_data(40, 7)
    stage = DeviceStage(model.preprocessing, dtype=model.config.dtype)
    found = validation_pass(model, stage, batches(x, y, 16), keep=5)
    model.eval()
    import jax.numpy as jnp

    logits = np.asarray(model(stage.eval_inputs(jnp.asarray(x))))
    np.testing.assert_allclose(found.logits, logits, atol=2e-5)
    np.testing.assert_array_equal(found.labels, y)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    wrong = np.flatnonzero(probs.argmax(-1) != y)
    assert len(wrong) >= 5
    top = wrong[np.argsort(-probs.max(-1)[wrong], kind="stable")][:5]
    np.testing.assert_array_equal(found.mistake_images, x[top])
    np.testing.assert_array_equal(found.mistake_labels, y[top])
    np.testing.assert_array_equal(found.mistake_predictions, probs.argmax(-1)[top])
    np.testing.assert_allclose(found.mistake_probabilities, probs.max(-1)[top], rtol=1e-4)


def test_reliability_bins_match_expected_calibration_error():
    from flaxvision import metrics

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.5, 500)
    labels = rng.integers(0, 4, 500)
    bins = metrics.calibration_bins(probs, labels)
    assert bins["count"].sum() == 500
    confidence, correct = probs.max(-1), probs.argmax(-1) == labels
    # Bin 14 holds confidences in (14/15, 1]: its accuracy and mean confidence by hand.
    inside = confidence > 14 / 15
    assert bins["count"][14] == inside.sum()
    assert bins["accuracy"][14] == pytest.approx(correct[inside].mean())
    assert bins["confidence"][14] == pytest.approx(confidence[inside].mean())


# ---- compare ---------------------------------------------------------------------------------------------------


def test_compare_page_overlays_curves_diffs_only_what_differs_and_shows_final_metrics(runs, tmp_path):
    out = tmp_path / "cmp"
    from flaxvision.report.compare import write_compare

    path = write_compare(runs, out)
    assert path == out / "compare.html" and sorted(os.listdir(out)) == ["compare.html"]
    page = Page(path.read_text())
    assert [img.get("data-file") for img in page.images] == ["train_loss.png", "val_loss.png", "val_accuracy.png"]
    recipe = page.table_with("field")
    assert recipe[0] == ["field", "fast", "slow"]
    assert [row[0] for row in recipe[1:]] == ["lr"]  # the only field that differs
    assert [float(v) for v in recipe[1][1:]] == [3e-3, 1e-4]
    final = {row[0]: row[1:] for row in page.table_with("")[1:]}
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert final["status"] == ["finished", "finished"]
    assert [float(v) for v in final["final val top-1"]] == pytest.approx([s["final_val_accuracy"] for s in summaries], abs=6e-5)
    assert [int(v) for v in final["steps"]] == [s["steps"] for s in summaries]


def test_compare_shows_an_unfinished_run_up_to_its_last_evaluation(runs, tmp_path):
    from flaxvision.report.compare import write_compare

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(runs[0] / name, unfinished / name)
    records = [json.loads(line) for line in (unfinished / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if r["type"] == "eval"][-1]
    page = Page(write_compare([runs[1], unfinished], tmp_path / "out").read_text())
    final = {row[0]: row[1:] for row in page.table_with("")[1:]}
    assert final["status"][1] == f"unfinished (step {max(r['step'] for r in records)})"
    assert float(final["final val top-1"][1]) == pytest.approx(last_eval["val_accuracy"], abs=6e-5)


@pytest.mark.parametrize("case", ["one run", "twice", "not a run", "out is a file", "out inside a run", "no recipe"])
def test_compare_refuses_bad_input_in_one_line_and_writes_nothing(runs, tmp_path, capsys, case):
    plain = tmp_path / "plain"
    plain.mkdir()
    (tmp_path / "file").write_text("x")
    norecipe = tmp_path / "norecipe"
    norecipe.mkdir()
    (norecipe / "metrics.jsonl").write_text("")
    (norecipe / "config.json").write_text("{}")
    args, message = {
        "one run": ([runs[0], "--out", tmp_path / "o"], "at least two run directories"),
        "twice": ([runs[0], runs[0], "--out", tmp_path / "o"], "is given twice"),
        "not a run": ([runs[0], plain, "--out", tmp_path / "o"], "is not a flaxvision run directory (no metrics.jsonl)"),
        "out is a file": ([*runs, "--out", tmp_path / "file"], "exists and is not a directory"),
        "out inside a run": ([*runs, "--out", runs[0] / "cmp"], "is inside the run directory"),
        "no recipe": ([runs[0], norecipe, "--out", tmp_path / "o"], "holds no run recipe"),
    }[case]
    before = snapshot(tmp_path), snapshot(runs[0])
    code, out, err = run_cli(["compare", *args], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and message in err, err
    assert_unchanged(tmp_path, before[0])
    assert_unchanged(runs[0], before[1])


# ---- in a real browser -----------------------------------------------------------------------------------------


def _chromium() -> str | None:
    return os.environ.get("FLAXVISION_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_and_compare_pages_load_every_image_offline_in_headless_chromium(runs, tmp_path):
    """Each page opened from disk in Chromium: every <img> decodes, nothing is requested but the page itself, and
    the screenshot is not blank."""
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium (scripts/test.sh installs Debian's chromium package where it can: run as root with apt)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    from PIL import Image

    from flaxvision.report.compare import write_compare

    pages = [runs[1] / "report.html", write_compare(runs, tmp_path / "cmp")]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            for path in pages:
                tab = browser.new_page(viewport={"width": 1100, "height": 900})
                url = path.resolve().as_uri()
                requested: list[str] = []
                tab.on("request", lambda r, requested=requested: requested.append(r.url))
                tab.goto(url, wait_until="load")
                images = tab.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
                assert len(images) >= 3 and all(done and w > 50 and h > 50 for done, w, h in images), (path, images)
                left = [u for u in requested if u != url and not u.startswith("data:")]
                assert not left, (path, left)
                shot = tmp_path / f"{path.stem}.png"
                tab.screenshot(path=str(shot), full_page=True)
                pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
                assert pixels.shape[0] > 900 and pixels.std() > 10, (path, pixels.shape, pixels.std())
                tab.close()
        finally:
            browser.close()


def test_a_cnn_run_reports_grad_cam_overlays(tmp_path):
    import flaxvision
    from flaxvision.train import fit

    xt, yt = colour_data(64, 0)
    xv, yv = colour_data(16, 1)
    model = flaxvision.create_model("cnn", num_classes=4, img_size=16, in_chans=3, seed=0)
    config = small_config(model="cnn", model_overrides={}, report=True, epochs=1, lr=0.05, optimizer="sgd")
    fit(config, run_dir=tmp_path / "cnn", model=model, train_data=batches(xt, yt, 32), val_data=batches(xv, yv, 16),
        class_names=CLASS_NAMES)  # fmt: skip
    page = Page((tmp_path / "cnn" / "report.html").read_text())
    captions = {img.get("data-file"): img.get("alt") for img in page.images}
    assert "Grad-CAM" in (captions.get("explanations.png") or ""), captions
    assert "reliability.png" in captions
