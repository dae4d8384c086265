"""Experiment trackers (`--log-to tensorboard,wandb,mlflow`, any subset): every metrics.jsonl record, the recipe as
hyperparameters and the report's figures as images also go to TensorBoard, Weights & Biases and/or MLflow.

    <run>/tensorboard/    event files; on --resume, TensorBoard drops what the stopped run logged after the restored
                          step, so the curves have no duplicate tail
    <run>/wandb/          an offline wandb run (unless WANDB_MODE says otherwise): `wandb sync <run>/wandb/offline-run-*`
    <run>/mlruns/         MLflow's store: mlflow.db (sqlite) and artifacts/, unless MLFLOW_TRACKING_URI names another
    <run>/tracking.json   the wandb and MLflow run ids, so that --resume continues the same runs

Scalars are tagged "<record type>/<field>" ("train/loss", "eval/val_accuracy", "epoch/images_per_second") at the
record's step; fields that are not numbers are skipped. Only process 0 tracks; the others get an empty `Trackers`.
A tracker that fails (its disk full, its server gone) is dropped with one warning on stderr: the run goes on and
metrics.jsonl stays complete. Everything here is created after the run's checks have passed; `check_packages`
runs before anything is written.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from flaxvision import files
from flaxvision.errors import ConfigError, TrainingInterrupted
from flaxvision.train.config import log_to_names

# tracker -> (the modules it needs, the pip extra that installs them). MLflow's local store is sqlite (its file
# store refuses to open since MLflow 3.x: "maintenance mode"), which takes SQLAlchemy and Alembic.
PACKAGES = {"tensorboard": (("tensorboard",), "tensorboard"), "wandb": (("wandb",), "wandb"),
            "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow")}  # fmt: skip


def check_packages(log_to: str | None) -> None:
    """One line naming the pip extra when a tracker's package is missing (before anything is written)."""
    for name in log_to_names(log_to):
        modules, extra = PACKAGES[name]
        if name == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI"):
            modules = modules[:1]  # a tracking server or the user's own store: no local sqlite
        for module in modules:
            try:
                found = importlib.util.find_spec(module) is not None
            except ValueError:  # imported, without a spec
                found = True
            if not found:
                raise ConfigError(f"--log-to {name} needs the {module} package: pip install 'flaxvision[{extra}]'")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers by tag: {"train/loss": 0.7, ...} (not its type and step; no bools)."""
    kind = record.get("type", "metrics")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip


def flat_recipe(recipe: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The recipe as flat hyperparameters: nested dicts as dotted keys ("model_overrides.depth"), None as "None",
    anything else that is not a plain value as JSON."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in recipe.items():
        if isinstance(value, dict) and value:
            out.update(flat_recipe(value, f"{prefix}{key}."))
        elif value is None:
            out[prefix + key] = "None"
        elif isinstance(value, (bool, int, float, str)):
            out[prefix + key] = value
        else:
            out[prefix + key] = json.dumps(value)
    return out


class Trackers:
    """The run's trackers; each call goes to every tracker still working. Empty (every call a no-op) without
    --log-to and on processes other than 0."""

    def __init__(self, trackers: Iterable[Any] = ()):
        self._trackers = list(trackers)
        self.step = 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._trackers]

    @classmethod
    def open(cls, log_to: str | None, run_dir: Path, run_record: dict[str, Any], *, step: int, resumed: bool,
             is_main: bool = True) -> Trackers:  # fmt: skip
        """Start each tracker named in `log_to` for the run in `run_dir` (config.json's `run_record`), at `step`
        (the restored step on resume, when the wandb and MLflow runs in tracking.json are continued)."""
        made = cls()
        names = log_to_names(log_to) if is_main else ()
        if not names:
            return made
        made.step = step
        saved = files.read_json(run_dir / "tracking.json")
        ids = dict(saved) if isinstance(saved, dict) else {}
        for name in names:
            try:
                made._trackers.append(OPENERS[name](run_dir, run_record, step=step, resumed=resumed, ids=ids))
            except Exception as err:
                _warn(name, "starting", err)
        if made._trackers:
            try:
                files.write_json(run_dir / "tracking.json", ids)
            except Exception as err:  # a full disk: the runs go on, a resume starts new ones
                print(f"flaxvision: warning: could not save the trackers' run ids ({err}); a --resume will start new "
                      "wandb/MLflow runs", file=sys.stderr)  # fmt: skip
        return made

    def log_record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record, at its step."""
        if not self._trackers:
            return
        self.step = int(record.get("step", self.step))
        values = scalars(record)
        if values:
            self._each(f"logging step {self.step}", lambda t: t.log(values, self.step))

    def log_hyperparameters(self, run_record: dict[str, Any], final_metrics: dict[str, Any]) -> None:
        """The recipe (config.json's train_config) with the run's final numbers (summary.json's), at the last step."""
        if not self._trackers:
            return
        recipe = run_record.get("train_config") or {}
        final = {k: float(v) for k, v in final_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._each("logging the hyperparameters", lambda t: t.hyperparameters(recipe, final, self.step))

    def log_images(self, paths: Iterable[str | os.PathLike]) -> None:
        """Figures (PNG files), tagged "report/<file stem>", at the last step."""
        images = [Path(p) for p in paths]
        if self._trackers and images:
            self._each("logging the report's figures", lambda t: t.images(images, self.step))

    def close(self, status: str = "finished") -> None:
        """Flush and close every tracker; `status`: "finished", "interrupted" or "failed" (how wandb and MLflow mark
        the run)."""
        self._each("closing", lambda t: t.close(status))
        self._trackers = []

    @contextlib.contextmanager
    def closing(self) -> Iterator[Trackers]:
        """Close on every way out: finished, interrupted (Ctrl-C), diverged or failed."""
        status = "failed"
        try:
            yield self
            status = "finished"
        except (KeyboardInterrupt, TrainingInterrupted):
            status = "interrupted"
            raise
        finally:
            self.close(status)

    def _each(self, doing: str, call: Callable[[Any], None]) -> None:
        for tracker in list(self._trackers):
            try:
                call(tracker)
            except Exception as err:
                self._trackers.remove(tracker)
                _warn(tracker.name, doing, err)
                if doing != "closing":
                    with contextlib.suppress(Exception):
                        tracker.close("failed")


def _warn(name: str, doing: str, err: BaseException) -> None:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    print(f"flaxvision: warning: {name} failed while {doing} ({type(err).__name__}: {first}); the run goes on "
          f"without {name} (metrics.jsonl has every record)", file=sys.stderr)  # fmt: skip


# ---- TensorBoard ------------------------------------------------------------------------------------------------


class TensorBoard:
    """Event files in <run>/tensorboard, written with tensorboard's own protos and record format, in the calling
    thread: a failed write (a full disk) raises here, which drops the tracker. (Writers with a background thread,
    such as tensorboardX's, lose the error there and then block the training loop once their queue is full.)"""

    name = "tensorboard"

    def __init__(self, run_dir: Path, run_record: dict[str, Any], *, step: int, resumed: bool, ids: dict[str, Any]):
        from tensorboard.summary.writer.record_writer import RecordWriter

        event_pb2 = _pb("tensorboard.compat.proto.event_pb2")
        directory = files.make_dirs(run_dir / "tensorboard")
        # TensorBoard reads a directory's event files in name order: seconds first, then nanoseconds for ties.
        now = time.time_ns()
        path = directory / f"events.out.tfevents.{now // 10**9:010d}.{socket.gethostname()}.{os.getpid()}.{now}"
        self._records = RecordWriter(open(path, "wb"))  # closed in close()
        self._event(0, file_version="brain.Event:2")
        if resumed:  # a restart at step + 1: TensorBoard drops the stopped run's later events (its "purge step")
            self._event(step + 1, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
        recipe = json.dumps(run_record.get("train_config") or {}, indent=2, sort_keys=True)
        self._summary(step, [self._text("recipe", f"```json\n{recipe}\n```")])

    def log(self, values: dict[str, float], step: int) -> None:
        Summary = _pb("tensorboard.compat.proto.summary_pb2").Summary
        self._summary(step, [Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])

    def hyperparameters(self, recipe: dict[str, Any], final: dict[str, float], step: int) -> None:
        """The hparams plugin's experiment, session start (the recipe) and end, with the final numbers as scalars
        "final/<name>" (the metrics the hparams table shows), all in this run."""
        from tensorboard.plugins.hparams import metadata

        Summary = _pb("tensorboard.compat.proto.summary_pb2").Summary
        api_pb2, plugin_data_pb2 = _pb("tensorboard.plugins.hparams.api_pb2"), _pb("tensorboard.plugins.hparams.plugin_data_pb2")
        hparams = flat_recipe(recipe)
        metrics = {f"final/{k}": v for k, v in final.items()}
        self.log(metrics, step)
        kinds = {bool: api_pb2.DATA_TYPE_BOOL, int: api_pb2.DATA_TYPE_FLOAT64, float: api_pb2.DATA_TYPE_FLOAT64, str: api_pb2.DATA_TYPE_STRING}  # fmt: skip
        experiment = api_pb2.Experiment(
            hparam_infos=[api_pb2.HParamInfo(name=k, type=kinds[type(v)]) for k, v in hparams.items()],
            metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics],
        )
        start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for k, v in hparams.items():  # (bool first: True is an int too)
            setattr(start.hparams[k], "bool_value" if isinstance(v, bool) else "string_value" if isinstance(v, str) else "number_value", v)
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
        parts = ((metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
                 (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
                 (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)))  # fmt: skip
        self._summary(step, [Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
                             for tag, data in parts])  # fmt: skip

    def images(self, paths: list[Path], step: int) -> None:
        """The PNG files as they are (TensorBoard shows encoded images)."""
        from PIL import Image

        Summary = _pb("tensorboard.compat.proto.summary_pb2").Summary
        values = []
        for path in paths:
            with Image.open(path) as image:
                size, channels = image.size, len(image.getbands())
            picture = Summary.Image(width=size[0], height=size[1], colorspace=channels, encoded_image_string=path.read_bytes())
            values.append(Summary.Value(tag=f"report/{path.stem}", image=picture))
        self._summary(step, values)

    def close(self, status: str) -> None:
        self._records.close()

    def _text(self, tag: str, text: str) -> Any:
        from tensorboard.plugins.text import metadata

        proto = "tensorboard.compat.proto."
        tensor = _pb(proto + "tensor_pb2").TensorProto(dtype=_pb(proto + "types_pb2").DT_STRING, string_val=[text.encode()],
                                                       tensor_shape=_pb(proto + "tensor_shape_pb2").TensorShapeProto())  # fmt: skip
        return _pb(proto + "summary_pb2").Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(tag, ""), tensor=tensor)

    def _summary(self, step: int, values: list[Any]) -> None:
        self._event(step, summary=_pb("tensorboard.compat.proto.summary_pb2").Summary(value=values))

    def _event(self, step: int, **fields: Any) -> None:
        event_pb2 = _pb("tensorboard.compat.proto.event_pb2")
        self._records.write(event_pb2.Event(wall_time=time.time(), step=step, **fields).SerializeToString())
        self._records.flush()  # each record on disk as it comes: a live TensorBoard sees it, a full disk fails here


# ---- Weights & Biases -----------------------------------------------------------------------------------------------


class Wandb:
    """A wandb run in <run>/wandb: offline unless WANDB_MODE is set (then wandb's own settings decide), project
    WANDB_PROJECT or "flaxvision", named after the run directory, with an id kept in tracking.json (a resume
    continues it: resume="allow"). The console is not captured (the run's output is the CLI's own)."""

    name = "wandb"

    def __init__(self, run_dir: Path, run_record: dict[str, Any], *, step: int, resumed: bool, ids: dict[str, Any]):
        import wandb

        settings: dict[str, Any] = {"console": "off"}
        if "WANDB_SILENT" not in os.environ:
            settings["silent"] = True
        mode = None
        if not os.environ.get("WANDB_MODE"):
            mode = "offline"
            # wandb's process-wide settings too: with them online, wandb probes its server (analytics) even for an
            # offline run.
            wandb.setup(settings=wandb.Settings(mode="offline"))
        ids.setdefault("wandb_id", secrets.token_hex(4))
        self.run = wandb.init(dir=str(run_dir.resolve()), project=os.environ.get("WANDB_PROJECT") or "flaxvision",
                              name=run_dir.resolve().name, id=ids["wandb_id"], resume="allow", mode=mode,
                              config=run_record.get("train_config") or {}, allow_val_change=True,
                              reinit="create_new", settings=wandb.Settings(**settings))  # fmt: skip

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def hyperparameters(self, recipe: dict[str, Any], final: dict[str, float], step: int) -> None:
        self.run.config.update(recipe, allow_val_change=True)
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})

    def images(self, paths: list[Path], step: int) -> None:
        import wandb

        self.run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in paths}, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


# ---- MLflow -----------------------------------------------------------------------------------------------------


class MLflow:
    """An MLflow run through MlflowClient (no global active run): tracking URI MLFLOW_TRACKING_URI, else a sqlite
    store under <run>/mlruns with the artifacts beside it; experiment MLFLOW_EXPERIMENT_NAME or "flaxvision"; the
    run id kept in tracking.json. Params are the flattened recipe (values cut to MLflow's length limit; MLflow
    params cannot change, so a resume with --allow-changes keeps the first values: config.json records the
    changes). A resumed run keeps the stopped run's points after the restored step (MLflow cannot delete them)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, run_record: dict[str, Any], *, step: int, resumed: bool, ids: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        given = os.environ.get("MLFLOW_TRACKING_URI") or None
        uri, artifacts = given, None
        if given is None:
            store = files.make_dirs(run_dir / "mlruns").resolve()
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        with _quiet("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
            self.client = MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "flaxvision"
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name, artifact_location=artifacts)
        run_id = self._continued(ids, given) if resumed else None
        if run_id is None:
            tags = {"flaxvision.run_dir": str(run_dir.resolve())}
            run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name, tags=tags).info.run_id
        self.run_id: str = run_id
        ids.update(mlflow_run_id=self.run_id, mlflow_tracking_uri=given)
        self._params(run_record.get("train_config") or {})

    def _continued(self, ids: dict[str, Any], given: str | None) -> str | None:
        """The run in tracking.json when it is in this store, marked running again."""
        if not ids.get("mlflow_run_id") or ids.get("mlflow_tracking_uri") != given:
            return None
        try:
            run_id = self.client.get_run(ids["mlflow_run_id"]).info.run_id
        except Exception:  # gone from the store
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _params(self, recipe: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flat_recipe(recipe).items() if k not in have]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def hyperparameters(self, recipe: dict[str, Any], final: dict[str, float], step: int) -> None:
        self._params(recipe)
        self.log({f"final/{k}": v for k, v in final.items()}, step)

    def images(self, paths: list[Path], step: int) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path="report")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))


def _pb(module: str) -> Any:
    """A generated protobuf module (its classes are made at import: no types to check against)."""
    return importlib.import_module(module)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Those loggers at WARNING for a moment (MLflow and Alembic announce the creation of a store at INFO)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


OPENERS: dict[str, Callable[..., Any]] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow}
