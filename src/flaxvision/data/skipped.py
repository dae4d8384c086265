"""Skipped-image accounting (main process): which unusable images a loader met, per epoch, and why."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision import files
from flaxvision.data.image_source import ImageSource
from flaxvision.data.transforms import BadImage, probe_image

REPORT_FILE = "skipped_images.json"


@dataclasses.dataclass
class SkippedImages:
    """Unusable images met by a loader: their ids per epoch (for an eval loader, per pass over the data)."""

    source: ImageSource
    epochs: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    count: int = 0  # occurrences, counting an image again in each epoch it was met

    @property
    def ids(self) -> list[int]:
        """Sorted ids of every image skipped so far."""
        return sorted({i for ids in self.epochs.values() for i in ids})

    def add(self, epoch: int, example_id: int) -> None:
        seen = self.epochs.setdefault(epoch, [])
        if example_id not in seen:
            seen.append(example_id)
            self.count += 1

    def reason(self, example_id: int) -> str:
        """Why this image is unusable (decoded again in this process: it is rare and only for the report)."""
        positions = np.flatnonzero(self.source.ids == example_id)
        if not len(positions):
            return "unknown id"
        try:
            probe_image(self.source[int(positions[0])]["image"])
        except BadImage as err:
            return str(err)
        return "decoded at report time (an intermittent read failure?)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.source.name,
            "count": self.count,
            "epochs": {
                str(epoch): [{"id": i, "where": self.source.describe(i), "reason": self.reason(i)} for i in ids]
                for epoch, ids in sorted(self.epochs.items())
            },
        }

    def write_report(self, run_dir: str | os.PathLike) -> Path:
        """Write `skipped_images.json` (ids, locations and reasons per epoch) into `run_dir`; return its path."""
        path = Path(run_dir) / REPORT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(path, self.to_dict())
        return path
