"""Orbax checkpoints of a run: the last K steps plus the best by validation top-1, written atomically.

Each checkpoint holds two items: "state" (the whole TrainState pytree: parameters, optimizer state, BatchNorm
statistics, step, running metrics) and "meta" (JSON: epoch position, data-iterator state, best metric so far).
Orbax writes into a temporary directory and renames it when complete, so a process killed mid-write leaves the
previous checkpoints as they were and `latest_step()` never returns a partial one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from flaxvision.errors import FlaxvisionError


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
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, val_accuracy: float | None = None) -> None:
        metrics = {"val_accuracy": float(val_accuracy)} if val_accuracy is not None else None
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restore `step` into arrays shaped and sharded like `like` (a TrainState)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise FlaxvisionError(
                f"cannot restore checkpoint {step} from {self.directory}: {str(err).splitlines()[0]}; "
                "was it written by a run with another model or optimizer? use --overwrite to start afresh"
            ) from err
        return restored.state, restored.meta

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
