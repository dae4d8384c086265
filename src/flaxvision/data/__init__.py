"""Input pipeline: Hub datasets, `save_to_disk` directories, parquet files and image folders to the device.

    >>> import flaxvision
    >>> data = flaxvision.data.load("ethz/food101", classes=20)          # train / val sources + class names
    >>> loader = flaxvision.data.make_loader(data.train, preprocessing=model.preprocessing, batch_size=32,
    ...                                      train=True, workers=4)
    >>> for batch in loader: ...                                        # uint8 images, int32 labels, valid mask

Stages, one module each: `sources` (spec -> random-access split), `transforms` (decode + host augmentation,
PIL/numpy), `pipeline` (grain: order, sharding, workers, device prefetch, resumable state, skipped images),
`device` (jitter + normalisation inside jit).
"""

from flaxvision.data.device import DevicePreprocess, device_preprocess
from flaxvision.data.pipeline import REPORT_FILE, Loader, LoaderIterator, SkippedImages, make_loader
from flaxvision.data.sources import DatasetSplits, ImageSource, load, resolve_kind, stratified_split
from flaxvision.data.transforms import AugmentConfig, BadImage, random_resized_box

__all__ = [
    "AugmentConfig", "BadImage", "DatasetSplits", "DevicePreprocess", "ImageSource", "Loader", "LoaderIterator",
    "REPORT_FILE", "SkippedImages", "device_preprocess", "load", "make_loader", "random_resized_box",
    "resolve_kind", "stratified_split",
]  # fmt: skip
