"""The ViT checkpoints people fine-tune, by timm's names: DeiT, DeiT III, DINOv2 (with registers), CLIP, SigLIP,
EVA-02.

Each name is timm's architecture with the preprocessing of its default pretrained weights (timm's pretrained_cfg),
so `create_model(name)` and weights imported for it agree on how images become inputs. Sizes and options from the
papers, as timm sets them:
    DeiT (Touvron et al. 2021): the ViT sizes trained on ImageNet-1k alone; the distilled variant adds a
        distillation token and head (its logits are the mean of both heads).
    DeiT III (Touvron et al. 2022): layer scale 1e-6, position embedding for the patches only.
    DINOv2 (Oquab et al. 2023): patch 14 at 518 px, layer scale 1e-5; "reg4" adds four register tokens
        (Darcet et al. 2024) with no position embedding of their own. Published as backbones (no head).
    CLIP (Radford et al. 2021): a LayerNorm before the encoder, no patch-projection bias, LayerNorm eps 1e-5,
        CLS-token pooling.
    SigLIP (Zhai et al. 2023): no CLS token, attention pooling (MAP) over every token.
    EVA-02 (Fang et al. 2023): patch 14, rotary position embeddings (scaled to the 16 x 16 grid of 224 px) besides
        the learned ones, SwiGLU MLPs of int(D * 8/3) (base: with a sub-LN before fc2), query and value biases
        only, mean pooling with fc_norm. The mim_in22k weights are backbones (no head), CLIP's mean and std.
"""

from __future__ import annotations

from flaxvision.models.registry import register_model
from flaxvision.models.vit import ViTConfig  # (importing vit registers the family)
from flaxvision.preprocessing import HALF, IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocessing


def _timm(img_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct: float = 0.9) -> Preprocessing:
    return Preprocessing(img_size, mean, std, crop_pct=crop_pct, resize_mode="shortest", interpolation="bicubic")


_SIZES = {"tiny": ViTConfig.tiny, "small": ViTConfig.small, "base": ViTConfig.base, "large": ViTConfig.large}

for _size in ("tiny", "small", "base"):
    register_model(f"deit_{_size}_patch16_224", _SIZES[_size](patch=16), f"DeiT-{_size[0].upper()}/16, 224 px (ImageNet-1k)",
                   preprocessing=_timm())  # fmt: skip
register_model("deit_base_distilled_patch16_224", ViTConfig.base(patch=16, distilled=True),
               "DeiT-B/16 distilled: CLS and distillation heads averaged, 224 px", preprocessing=_timm())  # fmt: skip
for _size in ("small", "base"):
    register_model(f"deit3_{_size}_patch16_224", _SIZES[_size](patch=16, no_embed_class=True, init_values=1e-6),
                   f"DeiT III-{_size[0].upper()}/16: layer scale, 224 px", preprocessing=_timm())  # fmt: skip

_DINO = _timm(518, crop_pct=1.0)
for _size in ("small", "base", "large"):
    register_model(f"vit_{_size}_patch14_dinov2", _SIZES[_size](patch=14, img_size=518, init_values=1e-5),
                   f"DINOv2 ViT-{_size[0].upper()}/14 backbone, 518 px", preprocessing=_DINO)  # fmt: skip
for _size in ("small", "base"):
    register_model(f"vit_{_size}_patch14_reg4_dinov2",
                   _SIZES[_size](patch=14, img_size=518, init_values=1e-5, reg_tokens=4, no_embed_class=True),
                   f"DINOv2 ViT-{_size[0].upper()}/14 with 4 registers, 518 px", preprocessing=_DINO)  # fmt: skip

register_model("vit_base_patch16_clip_224", ViTConfig.base(patch=16, pre_norm=True, patch_bias=False, layer_norm_eps=1e-5),
               "CLIP ViT-B/16 image tower: pre-norm, CLS pooling, 224 px",
               preprocessing=_timm(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_pct=0.95))  # fmt: skip  (timm: laion2b_ft_in12k_in1k)
register_model("vit_base_patch16_siglip_224", ViTConfig.base(patch=16, class_token=False, global_pool="map"),
               "SigLIP ViT-B/16 image tower: no CLS token, attention pooling, 224 px",
               preprocessing=_timm(mean=HALF, std=HALF))  # fmt: skip

# EVA-02 (timm's eva02_*_patch14_224; Eva's defaults: global_pool "avg" with fc_norm, LayerNorm eps 1e-6).
for _size, (_width, _heads, _mlp) in {"tiny": (192, 3, "swiglu_packed"), "small": (384, 6, "swiglu_packed"),
                                      "base": (768, 12, "swiglu")}.items():  # fmt: skip
    register_model(f"eva02_{_size}_patch14_224",
                   ViTConfig(patch_size=14, width=_width, depth=12, num_heads=_heads, mlp_dim=int(_width * 4 * 2 / 3), mlp=_mlp,
                             scale_mlp=_size == "base", key_bias=False, rope=True, rope_ref_grid=16, global_pool="avg"),
                   f"EVA-02-{_size[0].upper()}/14 backbone (MIM on ImageNet-22k): rotary embeddings, SwiGLU, 224 px",
                   preprocessing=_timm(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD))  # fmt: skip
