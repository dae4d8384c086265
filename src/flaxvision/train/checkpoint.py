"""Orbax checkpoints of a run: the last K steps plus the best by validation top-1, written atomically.

Each checkpoint holds two items: "state" (the whole TrainState pytree: parameters, optimizer state, BatchNorm
statistics, step, running metrics) and "meta" (a `Progress` as JSON: epoch position, data-iterator states, best
metric so far, clocks). Orbax writes into a temporary directory and renames it when complete, so a process killed
mid-write leaves the previous checkpoints as they were. A checkpoint damaged afterwards (a truncated array file,
lost metadata) is skipped on restore, with the reason, in favour of the newest intact one.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from flaxvision.errors import FlaxvisionError


@dataclasses.dataclass
class Progress:
    """Where a run stands: what a checkpoint needs besides the arrays to continue exactly."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of the current epoch consumed
    data_state: Any = None  # this process's data-iterator state (None at an epoch boundary)
    data_states: list[Any] | None = None  # every process's, as saved (process i resumes from entry i)
    best_val_accuracy: float | None = None
    best_step: int | None = None
    wall_seconds: float = 0.0
    train_seconds: float = 0.0  # time in training steps, compilation excluded
    train_images: int = 0  # images trained on in the timed steps
    processes: int = 1  # how many processes saved it

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def improves(self, val_accuracy: float) -> bool:
        return self.best_val_accuracy is None or val_accuracy > self.best_val_accuracy


@dataclasses.dataclass(frozen=True)
class Skipped:
    step: int
    reason: str

    def __str__(self) -> str:
        return f"skipped checkpoint {self.step}: {self.reason}"


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(keep),
                checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m["val_accuracy"], n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, progress: Progress, *, val_accuracy: float | None = None) -> None:
        metrics = {"val_accuracy": float(val_accuracy)} if val_accuracy is not None else None
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(progress.to_json())),
            metrics=metrics,
            force=True,
        )

    def restore(self, step: int, like: Any) -> tuple[Any, Progress]:
        """Restore `step` into arrays shaped and sharded like `like` (a TrainState)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return restored["state"], Progress.from_json(restored["meta"])  # a Composite is a Mapping of the items

    def restore_newest(self, like: Any, *, at_most: int | None = None) -> tuple[int, Any, Progress, list[Skipped]]:
        """The newest checkpoint (at or before step `at_most`) that restores completely, and those skipped on the way.

        A step directory that Orbax does not list (its metadata is gone) counts as damaged too. Raises a
        FlaxvisionError when no checkpoint is intact.
        """
        listed = set(self.all_steps())
        on_disk = {int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()} if self.directory.is_dir() else set()
        skipped = [Skipped(s, "its metadata is missing (incomplete or damaged)") for s in sorted(on_disk - listed, reverse=True)]
        for step in sorted(listed, reverse=True):
            if at_most is not None and step > at_most:
                continue
            try:
                state, progress = self.restore(step, like)
                return step, state, progress, sorted(skipped, key=lambda s: -s.step)
            except Exception as err:  # any damage: Orbax and tensorstore raise many kinds
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                skipped.append(Skipped(step, f"unreadable ({reason})"))
        where = "; ".join(map(str, sorted(skipped, key=lambda s: -s.step))) or "none was written"
        raise FlaxvisionError(
            f"no intact checkpoint in {self.directory} ({where}); start afresh with --overwrite"
            if skipped else f"no checkpoint in {self.directory} to resume from; start the run without --resume"
        )

    def set_aside(self, steps: list[int], where: Path) -> None:
        """Move damaged checkpoints out of the way (into `where`, kept for inspection) so that new saves of those
        steps do not collide with them."""
        where.mkdir(parents=True, exist_ok=True)
        for step in steps:
            source = self.directory / str(step)
            if source.exists():
                target = where / str(step)
                shutil.rmtree(target, ignore_errors=True)
                source.rename(target)
        self.manager.reload()

    def delete_after(self, step: int) -> list[int]:
        """Remove the checkpoints saved after `step` (they continue a trajectory that is being abandoned)."""
        later = [s for s in self.all_steps() if s > step]
        for s in later:
            self.manager.delete(s)
        return later

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def has_checkpoints(directory: str | Path) -> bool:
    path = Path(directory)
    return path.is_dir() and any(p.is_dir() and p.name.isdigit() for p in path.iterdir())


def clear(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
