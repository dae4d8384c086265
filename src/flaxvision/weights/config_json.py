"""The JSON types of the config.json keys the weight format modules read, checked before any of them reads one.

A format module reads `cfg.get("hidden_size", 768)` and hands it on; a string there, a list hidden_act or a NaN
epsilon would fail deep inside it, or be cast (`bool("no")` is True, `int("3")` is 3). `check_config_json` refuses
such a file first, naming the key and the value. Keys are matched by name at any depth (top level, vision_config,
timm's model_args and pretrained_cfg, a flaxvision config), with transformers', timm's and ViTImageProcessor's
spellings; ranges are the model configs' business (`models.base.check_common`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flaxvision.errors import FlaxvisionError

# The JSON type of config keys the format modules read, wherever they appear (top level, vision_config,
# model_args, pretrained_cfg, a flaxvision config): transformers', timm's and ViTImageProcessor's spellings.
_INT, _NUMBER, _BOOL, _STR, _DICT = "an integer", "a number", "true or false", "a string", "a JSON object"
_SIZE, _NUMBERS, _LIST = "an integer or a list of integers", "a list of numbers", "a list"
CONFIG_KEYS: dict[str, str] = {
    **dict.fromkeys(("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels",
                     "num_labels", "num_classes", "embed_dim", "depth", "num_heads", "in_chans", "reg_tokens",
                     "num_register_tokens", "embedding_size"), _INT),
    **dict.fromkeys(("image_size", "patch_size", "img_size", "input_size", "depths", "hidden_sizes", "stage_depths",
                     "stage_widths", "dims"), _SIZE),
    **dict.fromkeys(("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate",
                     "mlp_ratio", "drop_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate", "crop_pct",
                     "rescale_factor", "layerscale_value", "layer_scale_init_value"), _NUMBER),
    **dict.fromkeys(("qkv_bias", "class_token", "no_embed_class", "do_normalize", "do_resize", "do_center_crop",
                     "do_rescale", "use_swiglu_ffn"), _BOOL),
    **dict.fromkeys(("model_type", "hidden_act", "architecture", "global_pool", "interpolation", "crop_mode",
                     "config_class", "format", "act_layer"), _STR),
    **dict.fromkeys(("id2label", "label2id", "model_args", "pretrained_cfg", "vision_config", "preprocessing"), _DICT),
    **dict.fromkeys(("image_mean", "image_std", "mean", "std"), _NUMBERS),
    **dict.fromkeys(("architectures", "label_names"), _LIST),
}  # fmt: skip
NULLABLE = {"label_names", "act_layer", "crop_size", "architectures"}  # null is a value these keys have (flaxvision, timm, transformers)
_SIZE_KEYS = {"size", "crop_size"}  # ViTImageProcessor: an integer, or {"height": h, "width": w} / {"shortest_edge": s}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _json_type_ok(key: str, value: Any) -> bool:
    kind = CONFIG_KEYS.get(key)
    if key in _SIZE_KEYS:
        return _is_int(value) or (isinstance(value, dict) and all(_is_int(v) for v in value.values()))
    if kind == _INT:
        return _is_int(value)
    if kind == _SIZE:
        return _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))
    if kind == _NUMBER:
        return _is_number(value)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    if kind == _DICT:
        return isinstance(value, dict)
    if kind == _NUMBERS:
        return isinstance(value, list) and all(_is_number(v) for v in value)
    if kind == _LIST:
        return isinstance(value, list)
    return True


def check_config_json(data: dict[str, Any], path: Path, where: str = "") -> None:
    """Refuse a config file whose known keys (`CONFIG_KEYS`, at any depth) hold the wrong JSON type, naming the
    key and the value: a string hidden_size or a list hidden_act would otherwise fail deep inside a format module,
    or be cast (bool("no") is True)."""
    for key, value in data.items():
        name = f"{where}{key}"
        if value is None and key in NULLABLE:
            continue
        if not _json_type_ok(key, value):
            expected = "an integer or an object of integers" if key in _SIZE_KEYS else CONFIG_KEYS[key]
            raise FlaxvisionError(f"'{path}': {name}={short(value)} should be {expected}; fix the file or re-download it")
        if key == "id2label" and isinstance(value, dict):
            indices = sorted(value, key=lambda k: (len(k), k))
            if indices != [str(i) for i in range(len(value))]:
                raise FlaxvisionError(
                    f"'{path}': {name} keys should be the class indices '0' .. '{len(value) - 1}', got "
                    f"{short(indices)}; fix the file or re-download it"
                )
        elif isinstance(value, dict) and key not in ("label2id",):
            check_config_json(value, path, f"{name}.")


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


