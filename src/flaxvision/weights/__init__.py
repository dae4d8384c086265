"""Pretrained weights: import from transformers, timm, Google .npz and flaxvision checkpoints, and export back.

One module per checkpoint format (transformers, timm, npz, native), `posembed` for resolution changes, `hub` for
finding and safely reading the files, `convert` for what the formats share; `loader` and `export` tie them together.
"""

from flaxvision.weights.export import FORMATS, save_pretrained
from flaxvision.weights.loader import LoadReport, load_pretrained
from flaxvision.weights.posembed import resample_pos_embed

__all__ = ["FORMATS", "LoadReport", "load_pretrained", "resample_pos_embed", "save_pretrained"]
