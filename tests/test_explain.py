"""Explanations (flaxvision.explain): attention rollout finds the patch a hand-built ViT attends to, Grad-CAM the
region a hand-built CNN's logit reads; the rollout walk reproduces the model's logits; overlays; predict --explain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import flaxvision
from flaxvision import explain as ex
from flaxvision.errors import FlaxvisionError
from flaxvision.weights import save_pretrained
from tests.helpers import TINY_VIT, error_lines, remount_read_only, run_cli, tiny_vit, tmpfs

GRID = 4  # TINY_VIT: 16 px, patches of 4
PATCH = 4


def _zero(model) -> None:
    """Every parameter of `model` set to zero (LayerNorm scales to one): a model that passes nothing on."""
    from flax import nnx

    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        ones = path[-1] == "scale"
        variable[...] = jnp.ones_like(variable[...]) if ones else jnp.zeros_like(variable[...])


def _attending_vit(patch: int, *, class_token: bool = True, depth: int = 2) -> Any:
    """A tiny ViT whose attention, in every block and head, goes to patch `patch` (row-major on the 4 x 4 grid).

    Patch embedding, projections and MLP outputs are zero, so every block leaves the tokens as they are: the
    position embedding alone. The chosen patch's position is +s/-s on channels 2, 3, which the key projection
    maps to a large key k. With a CLS token its position is +s/-s on channels 0, 1, mapped to the query k: the
    CLS token looks at the patch and the other tokens (query 0) look everywhere alike. Without a CLS token every
    token's query is k (the query bias), so every token looks at the patch."""
    kw = {} if class_token else {"class_token": False, "global_pool": "avg"}
    model: Any = tiny_vit(0, **{**TINY_VIT, "depth": depth, **kw})
    _zero(model)
    d = model.config.width
    prefix = model.config.num_prefix_tokens
    pos = np.zeros((1, prefix + GRID * GRID, d), np.float32)
    pos[0, prefix + patch, 2:4] = (1.0, -1.0)
    if class_token:
        pos[0, 0, 0:2] = (1.0, -1.0)
    model.pos_embed[...] = jnp.asarray(pos)
    for block in model.blocks:
        kernel = np.zeros((d, 3 * d), np.float32)
        kernel[2, d : 2 * d], kernel[3, d : 2 * d] = 0.5, -0.5  # keys from the patch's channels
        kernel[0, :d], kernel[1, :d] = 0.5, -0.5  # queries from the CLS token's
        block.attn.qkv.kernel[...] = jnp.asarray(kernel)
        if not class_token:
            bias = np.zeros(3 * d, np.float32)
            bias[:d] = 4.0  # LayerNorm makes the patch's channels +-4: the same query size as the CLS token's
            block.attn.qkv.bias[...] = jnp.asarray(bias)
    return model


def _peak(heat: np.ndarray) -> tuple[int, int]:
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(col)


@pytest.mark.parametrize("class_token", [True, False], ids=["cls", "no-cls-avg-pool"])
def test_a_rollout_of_a_vit_built_to_attend_to_one_patch_peaks_on_that_patch(class_token):
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))  # the content does not matter: no patch embedding
    for patch in (5, 14):  # two patches: a constant answer fails
        model = _attending_vit(patch, class_token=class_token)
        _, joint = ex.rollout_walk(model, images)
        probs = model.blocks[0].attn.with_probs(model.blocks[0].norm1(model.embed(images)))[1]
        prefix = model.config.num_prefix_tokens  # the CLS token, or (without one) the first patch, looks at it
        assert float(probs[:, :, 0, prefix + patch].min()) > 0.99
        heat = ex.explain(model, images)
        assert heat.shape == (2, 16, 16) and heat.dtype == np.float32 and heat.min() >= 0 and heat.max() == 1
        for image_heat in heat:
            row, col = _peak(image_heat)
            assert (row // PATCH, col // PATCH) == divmod(patch, GRID), (patch, row, col)
        assert np.allclose(np.asarray(joint).sum(axis=-1), 1.0, atol=1e-5)  # rows of a product of row-stochastic maps


def test_rollout_reads_the_cls_row_and_not_the_patches_mean_row():
    """With a CLS token the other tokens look everywhere alike: their mean row is flat, the CLS row is not."""
    model = _attending_vit(9)
    images = jnp.zeros((1, 16, 16, 3))
    _, joint = ex.rollout_walk(model, images)
    cls_row = np.asarray(ex.rollout_rows(model, joint))[0]
    patch_rows = np.asarray(joint)[0, 1:, 1:].mean(axis=0)
    assert np.argmax(cls_row) == 9 and cls_row.max() > 3 * np.sort(cls_row.ravel())[-2]
    assert patch_rows.max() - patch_rows.min() < 0.1 * (cls_row.max() - cls_row.min())


@pytest.mark.parametrize("overrides,rows", [
    ({}, [0]), ({"distilled": True}, [0, 1]), ({"global_pool": "token_avg", "reg_tokens": 2}, [0]),
    ({"global_pool": "avg"}, "patches"), ({"global_pool": "map", "reg_tokens": 1}, "patches"),
])  # fmt: skip
def test_rollout_reads_the_rows_of_the_tokens_the_head_reads(overrides, rows):
    """CLS (DeiT: and the distillation token) when the head reads it; the patches' mean row when it pools them."""
    model: Any = tiny_vit(0, **overrides)
    prefix, t = model.config.num_prefix_tokens, model.config.num_tokens
    joint = jax.random.uniform(jax.random.key(5), (2, t, t))
    chosen = np.asarray(joint)[:, prefix:] if rows == "patches" else np.asarray(joint)[:, rows]
    expected = chosen.mean(axis=1)[:, prefix:].reshape(2, GRID, GRID)
    np.testing.assert_allclose(np.asarray(ex.rollout_rows(model, joint)), expected, rtol=1e-6)


VIT_VARIANTS = {
    "plain": {},
    "rope-qk-norm-registers-layer-scale": dict(rope=True, qk_norm=True, reg_tokens=2, init_values=0.1),
    "avg-pool-no-cls": dict(global_pool="avg", class_token=False),
    "map-pool-no-embed-class": dict(global_pool="map", class_token=False, no_embed_class=True),
    "distilled": dict(distilled=True),
    "eva-swiglu-sub-ln-qv-bias-pre-norm": dict(mlp="swiglu", scale_attn_inner=True, scale_mlp=True, key_bias=False, pre_norm=True),
    "token-avg-packed-swiglu": dict(global_pool="token_avg", mlp="swiglu_packed", reg_tokens=1, no_embed_class=True),
}


@pytest.mark.parametrize("overrides", list(VIT_VARIANTS.values()), ids=list(VIT_VARIANTS))
def test_the_rollout_walk_reproduces_the_model_logits(overrides):
    model: Any = tiny_vit(3, **{"depth": 2, **overrides})
    model.eval()
    images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    logits, joint = ex.rollout_walk(model, images)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(images)), atol=1e-5, rtol=0)
    t = model.config.num_tokens
    assert joint.shape == (3, t, t)
    heat = ex.explain(model, images)
    assert heat.shape == (3, 16, 16) and 0 <= heat.min() and heat.max() <= 1


def _region_cnn() -> Any:
    """A tiny CNN (16 px RGB) whose class 0 logit is the sum of the red channel's features and class 1's the
    green channel's: conv1 and conv2 pass red to channel 0 and green to channel 1, fc1 sums each channel over
    every position, the head is the identity. In an image black but for a red and a green square, the class 0
    logit depends on the red square's region only, class 1's on the green one's."""
    model: Any = flaxvision.create_model("cnn", num_classes=2, img_size=16, in_chans=3, features=(2, 2), hidden=2)
    _zero(model)
    conv1 = np.zeros((3, 3, 3, 2), np.float32)
    conv1[1, 1, 0, 0] = conv1[1, 1, 1, 1] = 1.0
    model.conv1.kernel[...] = jnp.asarray(conv1)
    conv2 = np.zeros((3, 3, 2, 2), np.float32)
    conv2[1, 1, 0, 0] = conv2[1, 1, 1, 1] = 1.0
    model.conv2.kernel[...] = jnp.asarray(conv2)
    fc1 = np.zeros((4 * 4, 2, 2), np.float32)  # flattened (h, w, channel) -> hidden
    fc1[:, 0, 0] = fc1[:, 1, 1] = 1.0
    model.fc1.kernel[...] = jnp.asarray(fc1.reshape(32, 2))
    model.head.kernel[...] = jnp.eye(2)
    return model


def _squares(red: tuple[int, int], green: tuple[int, int]) -> np.ndarray:
    image = np.zeros((16, 16, 3), np.float32)
    image[red[0] : red[0] + 4, red[1] : red[1] + 4, 0] = 1.0
    image[green[0] : green[0] + 4, green[1] : green[1] + 4, 1] = 1.0
    return image


def _inside(point: tuple[int, int], corner: tuple[int, int]) -> bool:
    return corner[0] <= point[0] < corner[0] + 4 and corner[1] <= point[1] < corner[1] + 4


def test_gradcam_of_a_cnn_whose_logit_depends_on_one_region_peaks_there():
    model = _region_cnn()
    placements = [((0, 0), (8, 12)), ((12, 8), (4, 0))]  # (red corner, green corner): two layouts
    images = jnp.asarray(np.stack([_squares(r, g) for r, g in placements]))
    for target, colour in ((0, 0), (1, 1)):  # class 0 reads red, class 1 green
        heat = ex.explain(model, images, "gradcam", targets=[target, target])
        assert heat.shape == (2, 16, 16) and heat.dtype == np.float32 and heat.max() == 1
        for image_heat, corners in zip(heat, placements, strict=True):
            assert _inside(_peak(image_heat), corners[colour]), (target, corners, _peak(image_heat))
            assert image_heat[corners[1 - colour][0] + 1, corners[1 - colour][1] + 1] < 0.05  # the other square: cold
    # No targets: the predicted class. A bigger red square makes class 0 the prediction.
    image = _squares((0, 0), (12, 12))
    image[0:8, 0:8, 0] = 1.0
    logits = np.asarray(model(jnp.asarray(image[None])))
    assert logits.argmax() == 0
    np.testing.assert_array_equal(ex.explain(model, image[None]), ex.explain(model, image[None], targets=[0]))


def test_gradcam_of_nothing_is_zeros_and_the_model_keeps_its_mode():
    model = _region_cnn()
    heat = ex.explain(model, jnp.zeros((2, 16, 16, 3)))  # no feature anywhere: a cam of zeros, not NaN
    assert np.array_equal(heat, np.zeros((2, 16, 16), np.float32))
    resnet: Any = flaxvision.create_model("resnet18_cifar", num_classes=3, img_size=32, stage_depths=(1, 1), stage_widths=(4, 8))
    resnet.train()
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    heat = ex.explain(resnet, images)
    assert heat.shape == (2, 32, 32) and np.isfinite(heat).all() and heat.max() == 1
    assert resnet.bn1.use_running_average is False  # back in training mode
    convnext: Any = flaxvision.create_model("convnext_tiny", num_classes=3, img_size=32, depths=(1, 1), dims=(8, 16), drop_path_rate=0.1)
    convnext.eval()
    heat = ex.explain(convnext, images, targets=np.array([2, 0]))
    assert heat.shape == (2, 32, 32) and np.isfinite(heat).all()
    assert convnext.stages[1].blocks[0].drop_path.deterministic is True


@pytest.mark.parametrize("name,overrides", [
    ("cnn", dict(num_classes=3, img_size=16, in_chans=3)),
    ("resnet18_cifar", dict(num_classes=3, img_size=32, stage_depths=(1, 1), stage_widths=(4, 8))),
    ("convnext_tiny", dict(num_classes=3, img_size=32, depths=(1, 1), dims=(8, 16))),
])  # fmt: skip
def test_the_feature_map_and_the_head_from_it_are_the_model(name, overrides):
    model: Any = flaxvision.create_model(name, **overrides)
    model.eval()
    images = jax.random.normal(jax.random.key(4), (2, overrides["img_size"], overrides["img_size"], 3))
    np.testing.assert_array_equal(np.asarray(model.head_from_map(model.feature_map(images))), np.asarray(model(images)))
    assert model.feature_map(images).ndim == 4


def test_methods_a_model_cannot_do_are_errors_naming_the_method_and_the_family():
    vit, cnn = tiny_vit(), _region_cnn()
    assert (ex.method_for(vit), ex.method_for(cnn)) == ("rollout", "gradcam")
    images = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(FlaxvisionError, match=r"'gradcam' does not work on a vit model \(ViT\); use 'rollout'"):
        ex.explain(vit, images, "gradcam")
    with pytest.raises(FlaxvisionError, match=r"'rollout' does not work on a cnn model \(CNN\); use 'gradcam'"):
        ex.explain(cnn, images, "rollout")
    with pytest.raises(FlaxvisionError, match=r"unknown explanation method 'lime'; use 'rollout' for a vit model"):
        ex.explain(vit, images, "lime")
    with pytest.raises(FlaxvisionError, match=r"no explanation method for a non-flaxvision model \(str\)"):
        ex.method_for("a model")
    with pytest.raises(FlaxvisionError, match="Grad-CAM targets must be 1 class indices from 0 to 1"):
        ex.explain(cnn, images, targets=[2])
    with pytest.raises(FlaxvisionError, match="expects images of shape"):
        ex.explain(vit, jnp.zeros((1, 8, 8, 3)))


def test_overlay_blends_a_colour_map_over_the_image_at_its_size():
    import matplotlib

    images = np.full((2, 8, 6, 3), 100, np.uint8)
    heat = np.zeros((2, 4, 3), np.float32)
    heat[0] = 1.0
    out = ex.overlay(images, heat, alpha=0.25)
    assert out.shape == (2, 8, 6, 3) and out.dtype == np.uint8
    jet = np.asarray(matplotlib.colormaps["jet"]([0.0, 1.0]))[:, :3] * 255
    np.testing.assert_allclose(out[0], np.rint(0.75 * 100 + 0.25 * jet[1]).astype(np.uint8)[None, None].repeat(8, 0).repeat(6, 1), atol=1)
    np.testing.assert_allclose(out[1, 3, 2], np.rint(0.75 * 100 + 0.25 * jet[0]), atol=1)
    gray = ex.overlay(np.full((1, 5, 5), 7, np.uint8), np.zeros((1, 5, 5)), alpha=0.0)  # grayscale -> RGB
    assert gray.shape == (1, 5, 5, 3) and (gray == 7).all()
    assert ex.overlay(np.zeros((1, 5, 5, 1), np.uint8), np.ones((1, 2, 2)), alpha=1.0).shape == (1, 5, 5, 3)
    for bad, match in (((images.astype(np.float32), heat), "uint8 images"), ((images, heat[:1]), "one heat map"),
                       ((images[..., :2], heat), "uint8 images")):  # fmt: skip
        with pytest.raises(FlaxvisionError, match=match):
            ex.overlay(*bad)
    with pytest.raises(FlaxvisionError, match="alpha must be in"):
        ex.overlay(images, heat, alpha=1.5)


def test_overlay_names_never_collide():
    paths = ["a/cat.png", "b/cat.jpg", "cat-2.png", "dog.png", "a/cat.png"]
    names = ex.overlay_names(paths, "rollout")
    assert names == ["cat_rollout.png", "cat-2_rollout.png", "cat-2-2_rollout.png", "dog_rollout.png", "cat-3_rollout.png"]


# ---- flaxvision predict --explain ---------------------------------------------------------------------------


@pytest.fixture
def vit_dir(tmp_path):
    model = _attending_vit(6)  # a heat map with contrast: rounding cannot move its colours
    model.label_names = ("red", "green", "blue", "grey")
    return save_pretrained(model, tmp_path / "vit")


def _images(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = [root / "one" / "cat.png", root / "two" / "cat.png", root / "dog.jpg"]
    for i, p in enumerate(paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 24, 3), dtype=np.uint8)).save(p)
    (root / "broken.png").write_bytes(b"not an image")
    return paths


def test_predict_explain_writes_one_overlay_per_image_without_overwriting(vit_dir, tmp_path, capsys):
    paths = _images(tmp_path / "images")
    out = tmp_path / "heat" / "maps"
    code, stdout, err = run_cli(["predict", vit_dir, *paths, tmp_path / "images" / "broken.png", "--explain", "rollout",
                                 "--out", out, "--json"], capsys)  # fmt: skip
    assert code == 0, err
    rows = json.loads(stdout)
    written = [Path(r["explanation"]) for r in rows[:3]]
    assert [p.name for p in written] == ["cat_rollout.png", "cat-2_rollout.png", "dog_rollout.png"]
    assert "explanation" not in rows[3] and "error" in rows[3]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    # Each file is the overlay of that image's rollout at the model's input size, on the crop the model saw.
    from flaxvision.data.device import DeviceStage
    from flaxvision.data.transforms import decode_eval

    model = flaxvision.load_pretrained(vit_dir)
    crops = np.stack([decode_eval(str(p), model.preprocessing) for p in paths])
    inputs = DeviceStage(model.preprocessing, devices=jax.devices()[:1]).eval_inputs(jnp.asarray(crops))
    expected = ex.overlay(crops, ex.explain(model, inputs))
    for picture, path in zip(expected, written, strict=True):
        saved = np.asarray(Image.open(path))
        assert saved.shape == (16, 16, 3)
        assert np.abs(saved.astype(int) - picture.astype(int)).max() <= 1
        assert ex.explain(model, inputs)[0][6 // GRID * PATCH + 1, 6 % GRID * PATCH + 1] == 1  # the hot patch
    assert not np.array_equal(np.asarray(Image.open(written[0])), np.asarray(Image.open(written[1])))


def test_predict_explain_gradcam_on_a_cnn(tmp_path, capsys):
    model_dir = save_pretrained(_region_cnn(), tmp_path / "cnn")
    image = _squares((0, 0), (8, 8))
    image[8:14, 8:14, 1] = 1.0  # a bigger green square: class 1 (green) is the prediction, so Grad-CAM's target
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "squares.png")
    out = tmp_path / "maps"
    code, stdout, _ = run_cli(["predict", model_dir, tmp_path / "squares.png", "--explain", "gradcam", "--out", out], capsys)
    assert code == 0 and stdout.startswith(f"{tmp_path / 'squares.png'}: 1 ")
    saved = np.asarray(Image.open(out / "squares_gradcam.png")).astype(int)
    hottest = _peak(saved[..., 0] - saved[..., 2])  # jet: red where the heat is 1, blue where it is 0
    assert 8 <= hottest[0] < 14 and 8 <= hottest[1] < 14, hottest


def _refused(args, capsys, *, written: Path | None = None) -> str:
    code, out, err = run_cli(args, capsys)
    lines = error_lines(err)
    assert code == 2 and out == "" and len(lines) == 1, (code, out, err)
    if written is not None:
        assert not written.exists()
    return lines[0]


def test_predict_explain_errors_are_one_line_before_the_model_runs(vit_dir, tmp_path, capsys):
    image = _images(tmp_path / "images")[0]
    out = tmp_path / "out"
    assert "give the directory with --out DIR" in _refused(["predict", vit_dir, image, "--explain", "rollout"], capsys)
    assert "add --explain rollout or gradcam" in _refused(["predict", vit_dir, image, "--out", out], capsys, written=out)
    line = _refused(["predict", vit_dir, image, "--explain", "gradcam", "--out", out], capsys, written=out)
    assert "'gradcam' does not work on a vit model (ViT); use 'rollout'" in line
    assert "invalid choice: 'lime'" in _refused(["predict", vit_dir, image, "--explain", "lime", "--out", out], capsys, written=out)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "exists and is not a directory" in _refused(["predict", vit_dir, image, "--explain", "rollout", "--out", a_file], capsys)
    under = a_file / "maps"
    assert f"cannot be created: {a_file} is not a directory" in _refused(
        ["predict", vit_dir, image, "--explain", "rollout", "--out", under], capsys)  # fmt: skip
    assert a_file.read_text() == "x"


def test_predict_explain_into_a_read_only_file_system_is_refused(vit_dir, tmp_path, capsys):
    image = _images(tmp_path / "images")[0]
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        remount_read_only(mnt)
        line = _refused(["predict", vit_dir, image, "--explain", "rollout", "--out", mnt / "maps"], capsys)
        assert "cannot be written: the file system is read-only" in line and not (mnt / "maps").exists()
