"""timm's Eva weights (EVA-02): model.safetensors + config.json (architecture eva02_*, model_args, pretrained_cfg).

Reading: the architecture's timm defaults (`ARCHITECTURES`: the Hub's timm/eva02_* config.json files carry no
model_args) updated by config.json's model_args; the tensors give width, depth, the MLP (SwiGLU's fc1_g / fc1_x,
GluMlp's packed fc1 of twice fc2's input, or a plain fc1), the sub-LNs, patch size and trained image size. The
rotary embedding has no tensors: `use_rot_pos_emb` and `ref_feat_shape` come from the arguments; a file without
them (a bare safetensors, an unknown architecture) with a gated MLP is read as EVA-02 (rope on, reference grid
16, as every EVA-02 in timm at patch 14) and says so in a warning. Options flaxvision's ViT cannot express here
(layer scale, registers, qk-norm, other rope types, post-norm ...) are refused, naming the option.
Writing: the same files; `timm.create_model(config["architecture"], pretrained=False, **config["model_args"])`
rebuilds exactly the architecture (every option explicit), then `load_state_dict(strict=True)`.

Layout: Eva's attention has no key bias (a zero buffer): q_bias / v_bias with the fused qkv (tiny, small), or
q_proj / k_proj / v_proj with biases on q and v only (base): flaxvision's fused kernel is [q | k | v] either
way. timm builds SwiGLU (fc1_g, fc1_x) when scale_mlp is on and the packed GluMlp (one fc1, gate first) when
it is off; the rules convert between that and flaxvision's `mlp` where the two differ.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

import flaxvision.weights.timm_format as timm_format
from flaxvision.errors import FlaxvisionError
from flaxvision.models.vit import ViTConfig
from flaxvision.preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocessing
from flaxvision.weights.convert import (
    Parsed,
    Rule,
    block_count,
    conv,
    copy,
    default_num_heads,
    detect_timm,
    export,
    fused,
    grid_of,
    import_params,
    linear,
    square,
)
from flaxvision.weights.hub import WeightFiles

logger = logging.getLogger(__name__)

FORMAT = "timm"
FAMILY = "Eva"
_BASE = dict(img_size=224, patch_size=14, depth=12, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16))
# timm's model_args of each architecture (timm/models/eva.py), before the caller's.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "eva02_tiny_patch14_224": dict(_BASE, embed_dim=192, num_heads=3),
    "eva02_small_patch14_224": dict(_BASE, embed_dim=384, num_heads=6),
    "eva02_base_patch14_224": dict(_BASE, embed_dim=768, num_heads=12, qkv_fused=False, scale_mlp=True),
}
EVA_REF_GRID = 16  # every EVA-02 at patch 14 in timm: ref_feat_shape (16, 16), the 224 px pretraining grid
# Eva's constructor defaults for what flaxvision reads.
DEFAULTS = dict(global_pool="avg", qkv_bias=True, qkv_fused=True, mlp_ratio=4.0, swiglu_mlp=False, scale_mlp=False,
                scale_attn_inner=False, use_rot_pos_emb=False, ref_feat_shape=None, use_fc_norm=None)  # fmt: skip
ARGS_READ = {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "swiglu_align_to",
             "drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", *DEFAULTS}  # fmt: skip
ARGS_IGNORED = {"dynamic_img_size", "patch_drop_rate", "head_init_scale"}
ARGS_FIXED = {"class_token": True, "num_reg_tokens": 0, "no_embed_class": False, "use_abs_pos_emb": True, "init_values": None,
              "qk_norm": False, "attn_type": "eva", "rope_type": "cat", "rope_grid_offset": 0.0, "rope_grid_indexing": "ij",
              "rope_temperature": 10000.0, "rope_rotate_half": False, "use_post_norm": False, "use_pre_transformer_norm": False,
              "use_post_transformer_norm": None, "num_kv_heads": None, "attn_head_dim": None, "attn_only_layer_scale": False,
              "dynamic_img_pad": False, "rope_shift_coords": None, "rope_jitter_coords": None, "rope_rescale_coords": None}  # fmt: skip
# Tensors of Eva options flaxvision does not read here, and the option behind each.
UNSUPPORTED_KEYS = (("reg_token", "num_reg_tokens (register tokens)"), (".gamma_1", "init_values (layer scale)"),
                    (".attn.q_norm.", "qk_norm"), ("norm_pre.", "use_pre_transformer_norm"), ("attn_pool.", "global_pool='map'"),
                    (".attn.gate.", "gated_attn"))  # fmt: skip


def is_layout(keys: Any) -> bool:
    return any(k.endswith((".attn.q_bias", ".attn.q_proj.weight")) for k in keys)


def detect(weights: WeightFiles) -> bool:
    return detect_timm(weights, lambda arch: arch.split(".")[0].startswith(("eva02_", "eva_")), is_layout)


def _is_eva(config: ViTConfig) -> bool:
    return config.rope or config.mlp != "mlp" or not config.key_bias or config.scale_attn_inner or config.scale_mlp


def exports(config: Any) -> bool:
    return isinstance(config, ViTConfig) and _is_eva(config) and refusal(config) is None


def refusal(config: Any) -> str | None:
    if not isinstance(config, ViTConfig) or not _is_eva(config):
        return None
    unsupported = {"distilled": config.distilled, "reg_tokens": config.reg_tokens, "init_values": config.init_values,
                   "qk_norm": config.qk_norm, "pre_norm": config.pre_norm, "no_embed_class": config.no_embed_class}  # fmt: skip
    bad = [f"{k}={v!r}" for k, v in unsupported.items() if v]
    if not config.class_token or not config.patch_bias:
        bad.append("class_token=False" if not config.class_token else "patch_bias=False")
    if config.global_pool not in ("token", "avg"):
        bad.append(f"global_pool={config.global_pool!r}")
    if config.qkv_bias and config.key_bias:
        bad.append("key_bias=True (Eva's attention has no key bias)")
    if config.mlp == "mlp" and config.act != "gelu":
        bad.append(f"act={config.act!r}")
    return f"timm's Eva layout cannot hold {', '.join(bad)}" if bad else None


def _separate_mlp(config: ViTConfig) -> bool:
    """timm's Eva builds SwiGLU (fc1_g, fc1_x) with scale_mlp or swiglu_align_to, else the packed GluMlp."""
    return config.mlp == "swiglu" or (config.mlp == "swiglu_packed" and config.scale_mlp)


def rules(config: ViTConfig, *, qkv_fused: bool, head: bool = True) -> list[Rule]:
    """Their tensors <-> flaxvision mapping for a timm Eva; `qkv_fused`: the file's attention layout."""
    out = [
        copy("cls_token", "cls_token"),
        copy("pos_embed", "pos_embed"),
        conv("patch_embed.proj.weight", "patch_embed.kernel"),
        copy("patch_embed.proj.bias", "patch_embed.bias"),
    ]

    def ln(src: str, dst: str) -> list[Rule]:
        return [copy(f"{src}.weight", f"{dst}.scale"), copy(f"{src}.bias", f"{dst}.bias")]

    def dense(src: str, dst: str) -> list[Rule]:
        return [linear(f"{src}.weight", f"{dst}.kernel"), copy(f"{src}.bias", f"{dst}.bias")]

    for i in range(config.depth):
        b = f"blocks.{i}."
        out += ln(f"{b}norm1", f"{b}norm1")
        if qkv_fused:
            out.append(linear(f"{b}attn.qkv.weight", f"{b}attn.qkv.kernel"))
            biases = (f"{b}attn.q_bias", f"{b}attn.v_bias")
        else:
            keys = tuple(f"{b}attn.{p}_proj.weight" for p in "qkv")
            out.append(fused(keys, f"{b}attn.qkv.kernel", lambda w: w.T, lambda k: k.T, axis=1))
            biases = (f"{b}attn.q_proj.bias", f"{b}attn.v_proj.bias")
        if config.qkv_bias:
            out += [copy(biases[0], f"{b}attn.q_bias"), copy(biases[1], f"{b}attn.v_bias")]
        if config.scale_attn_inner:
            out += ln(f"{b}attn.norm", f"{b}attn.norm")
        out += dense(f"{b}attn.proj", f"{b}attn.proj") + ln(f"{b}norm2", f"{b}norm2")
        if config.mlp == "swiglu":
            out += dense(f"{b}mlp.fc1_g", f"{b}mlp.fc1_g") + dense(f"{b}mlp.fc1_x", f"{b}mlp.fc1_x")
        elif _separate_mlp(config):  # flaxvision's packed fc1 [gate | value] <-> SwiGLU's fc1_g, fc1_x
            out.append(fused((f"{b}mlp.fc1_g.weight", f"{b}mlp.fc1_x.weight"), f"{b}mlp.fc1.kernel", lambda w: w.T, lambda k: k.T, axis=1))
            out.append(fused((f"{b}mlp.fc1_g.bias", f"{b}mlp.fc1_x.bias"), f"{b}mlp.fc1.bias", lambda a: a, lambda a: a, axis=0))
        else:
            out += dense(f"{b}mlp.fc1", f"{b}mlp.fc1")
        if config.scale_mlp:
            out += ln(f"{b}mlp.norm", f"{b}mlp.norm")
        out += dense(f"{b}mlp.fc2", f"{b}mlp.fc2")
    out += ln("fc_norm" if config.use_fc_norm else "norm", "norm")
    if head:
        out += dense("head", "head")
    return out


def to_flaxvision(tensors: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """Their tensor dict -> flaxvision flat dict."""
    fused_qkv = "blocks.0.attn.qkv.weight" in tensors
    return import_params(rules(config, qkv_fused=fused_qkv, head="head.weight" in tensors), tensors)


def from_flaxvision(params: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """flaxvision flat dict -> the state dict of the Eva that `config_files` describes."""
    return export(rules(config, qkv_fused=model_args(config)["qkv_fused"]), params)


def _arguments(cfg: dict[str, Any], what: str) -> tuple[dict[str, Any], bool]:
    """Eva's arguments: its defaults, the architecture's, then model_args; and whether they came from a known source."""
    architecture = str(cfg.get("architecture", "")).split(".")[0]
    given = dict(cfg.get("model_args") or {})
    known = architecture in ARCHITECTURES or "use_rot_pos_emb" in given
    args = {**DEFAULTS, **ARCHITECTURES.get(architecture, {}), **given}
    for name, value in given.items():
        if name in ARGS_READ or name in ARGS_IGNORED:
            continue
        if name not in ARGS_FIXED:
            raise FlaxvisionError(f"{what}: timm Eva argument {name}={value!r} is not supported by flaxvision's ViT")
        if value != ARGS_FIXED[name] and not (isinstance(value, (list, tuple)) and list(value) == ARGS_FIXED[name]):
            raise FlaxvisionError(f"{what}: timm Eva argument {name}={value!r} is not supported by flaxvision's ViT (only {ARGS_FIXED[name]!r})")
    return args, known


def parse(weights: WeightFiles) -> Parsed:
    """Architecture, mapping rules and metadata of timm Eva weights."""
    what = f"timm weights '{weights.origin}'"
    cfg = weights.config or {}
    args, known = _arguments(cfg, what)
    tensors = weights.tensors
    for fragment, option in UNSUPPORTED_KEYS:
        key = next((k for k in tensors if fragment in k or k.startswith(fragment)), None)
        if key is not None:
            raise FlaxvisionError(f"{what}: Eva's {option} is not supported by flaxvision's ViT (found tensor '{key}')")

    def get(key: str) -> np.ndarray:
        if key not in tensors:
            raise FlaxvisionError(f"{what}: cannot infer the architecture without '{key}'")
        return tensors[key]

    kernel = get("patch_embed.proj.weight")  # (D, C, p, p)
    width, in_chans, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2]
    if "cls_token" not in tensors:
        raise FlaxvisionError(f"{what}: class_token=False is not supported by flaxvision's Eva reader")
    fc2 = get("blocks.0.mlp.fc2.weight")  # (D, M)
    if "blocks.0.mlp.fc1_g.weight" in tensors:
        mlp = "swiglu"
    else:
        mlp = "swiglu_packed" if get("blocks.0.mlp.fc1.weight").shape[0] == 2 * fc2.shape[1] else "mlp"
    rope, ref = bool(args["use_rot_pos_emb"]), args["ref_feat_shape"]
    if not known:
        rope, ref = mlp != "mlp", EVA_REF_GRID if mlp != "mlp" else None
        logger.warning("%s: no timm arguments say whether it uses rotary embeddings; read as %s", what,
                       f"EVA-02 (gated MLP): rope with reference grid {EVA_REF_GRID}" if rope else "without rope")  # fmt: skip
    global_pool = cfg.get("global_pool", args["global_pool"])
    if global_pool not in ("token", "avg"):
        raise FlaxvisionError(f"{what}: global_pool={global_pool!r} is not supported; flaxvision reads Eva models pooling 'token' or 'avg'")
    has_head, has_fc_norm = "head.weight" in tensors, "fc_norm.weight" in tensors
    num_classes = tensors["head.weight"].shape[0] if has_head else 1
    fused_qkv = "blocks.0.attn.qkv.weight" in tensors
    config = ViTConfig(
        num_classes=num_classes,
        img_size=grid_of(get("pos_embed"), 1, what) * patch,
        patch_size=patch,
        in_chans=in_chans,
        width=width,
        depth=block_count(tensors, "blocks."),
        num_heads=int(args.get("num_heads") or default_num_heads(width)),
        mlp_dim=fc2.shape[1],
        qkv_bias="blocks.0.attn.q_bias" in tensors or "blocks.0.attn.q_proj.bias" in tensors,
        dropout_rate=float(args.get("proj_drop_rate", args.get("drop_rate", 0.0))),
        attention_dropout_rate=float(args.get("attn_drop_rate", 0.0)),
        drop_path_rate=float(args.get("drop_path_rate", 0.0)),
        global_pool=global_pool,
        fc_norm=None if has_fc_norm == (global_pool == "avg") else has_fc_norm,
        mlp=mlp,
        scale_attn_inner="blocks.0.attn.norm.weight" in tensors,
        scale_mlp="blocks.0.mlp.norm.weight" in tensors,
        key_bias=False,
        rope=rope,
        rope_ref_grid=square(ref, "ref_feat_shape", what) if rope and ref is not None else None,
    )
    if not fused_qkv and "blocks.0.attn.q_proj.weight" not in tensors:
        raise FlaxvisionError(f"{what}: no attention weights (blocks.0.attn.qkv.weight or q_proj.weight)")
    pretrained_cfg = cfg.get("pretrained_cfg") or {}
    labels = cfg.get("label_names") or pretrained_cfg.get("label_names")
    return Parsed(
        format="timm",
        tensors=tensors,
        config=config,
        rules=rules(config, qkv_fused=fused_qkv, head=has_head),
        has_head=has_head,
        label_names=tuple(str(n) for n in labels) if labels and len(labels) == num_classes and has_head else None,
        preprocessing=timm_format.preprocessing({"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, **pretrained_cfg}, config.img_size),
    )


def architecture_name(config: ViTConfig) -> str:
    """The timm constructor: the EVA-02 of this width, else base for SwiGLU, tiny for the packed MLP."""
    by_width = {args["embed_dim"]: name for name, args in ARCHITECTURES.items()}
    return by_width.get(config.width, "eva02_base_patch14_224" if config.mlp == "swiglu" else "eva02_tiny_patch14_224")


def model_args(config: ViTConfig) -> dict[str, Any]:
    """timm Eva keyword arguments that rebuild exactly this architecture (every option explicit)."""
    ratio = config.mlp_dim / config.width
    while int(config.width * ratio) < config.mlp_dim:  # timm computes int(embed_dim * mlp_ratio)
        ratio = float(np.nextafter(ratio, np.inf))
    args: dict[str, Any] = {
        "img_size": config.img_size,
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "num_classes": config.num_classes,
        "global_pool": config.global_pool,
        "embed_dim": config.width,
        "depth": config.depth,
        "num_heads": config.num_heads,
        "qkv_bias": config.qkv_bias,
        "qkv_fused": ARCHITECTURES[architecture_name(config)].get("qkv_fused", True),
        "mlp_ratio": ratio,
        "swiglu_mlp": config.mlp != "mlp",
        "scale_mlp": config.scale_mlp,
        "scale_attn_inner": config.scale_attn_inner,
        "use_rot_pos_emb": config.rope,
        "ref_feat_shape": [config.rope_ref_grid] * 2 if config.rope_ref_grid is not None else None,
        "use_fc_norm": config.use_fc_norm,
    }
    if config.mlp == "swiglu" and not config.scale_mlp:
        args["swiglu_align_to"] = 1  # SwiGLU (separate fc1_g, fc1_x) without the norm; aligning to 1 keeps the width
    return args


def config_files(config: ViTConfig, prep: Preprocessing, label_names: tuple[str, ...] | None) -> dict[str, dict[str, Any]]:
    """timm's config.json for these weights (as timm's save_for_hf writes it)."""
    files = timm_format.config_files(config, prep, label_names)
    files["config.json"].update(architecture=architecture_name(config), model_args=model_args(config))
    return files
