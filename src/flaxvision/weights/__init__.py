"""Pretrained weights: import from transformers, timm, Google .npz and flaxvision weights, and export back.

One module per weights format (transformers_format, timm_format, npz_format, native_format), `posembed` for
resolution changes, `hub` for finding and safely reading the files (`read_weights` -> `WeightFiles`), `convert`
for what the formats share; `loader` and `export` tie them together; `adapter` reads and writes LoRA adapters. ("Checkpoint" means the Orbax run state of
training, in flaxvision.train, and nothing here.)
"""

from flaxvision.weights.adapter import load_adapter, save_adapter
from flaxvision.weights.export import FORMATS, save_pretrained
from flaxvision.weights.loader import LoadReport, load_pretrained
from flaxvision.weights.posembed import resample_pos_embed

__all__ = ["FORMATS", "LoadReport", "load_adapter", "load_pretrained", "resample_pos_embed", "save_adapter", "save_pretrained"]
