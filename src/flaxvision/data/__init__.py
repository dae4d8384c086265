"""Input pipeline: Hub datasets, `save_to_disk` directories, parquet files and image folders to numpy batches.

    >>> import flaxvision
    >>> data = flaxvision.data.load("ethz/food101", classes=20)          # train / val sources + class names
    >>> loader = flaxvision.data.make_loader(data.train, preprocessing=model.preprocessing, batch_size=32,
    ...                                      train=True, workers=4)
    >>> for batch in loader: ...                                        # uint8 images, int32 labels, valid mask

Stages, one module each. Sources: `sources` (spec -> splits, class selection, checks) reading through
`hf_datasets` (Hub, save_to_disk, parquet) or `image_folder`, into `image_source` (`ImageSource`). Host work:
`transforms` (decode + host augmentation, PIL/numpy; RandAugment and TrivialAugment in `autoaugment`, random
erasing in `erasing`), `batches` (the worker-side batch maker), `pipeline` (the loader: order, sharding, resumable
state), `stream` (grain workers and their shared memory), `skipped` (unusable images). Device: `device` (transfer,
jitter + normalisation inside jit).
"""

from flaxvision.data.device import DevicePreprocess, device_preprocess
from flaxvision.data.image_source import DatasetSplits, ImageSource
from flaxvision.data.pipeline import REPORT_FILE, Loader, LoaderIterator, make_loader
from flaxvision.data.skipped import SkippedImages
from flaxvision.data.sources import load, resolve_kind, stratified_split
from flaxvision.data.transforms import IMAGE_SUFFIXES, AugmentConfig, BadImage, random_resized_box

__all__ = [
    "IMAGE_SUFFIXES", "AugmentConfig", "BadImage", "DatasetSplits", "DevicePreprocess", "ImageSource", "Loader",
    "LoaderIterator", "REPORT_FILE", "SkippedImages", "device_preprocess", "load", "make_loader",
    "random_resized_box", "resolve_kind", "stratified_split",
]  # fmt: skip
