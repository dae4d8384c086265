"""Several processes, one run: JAX's distributed runtime, parameter sharding, and what the processes share.

A multi-process run is `jax.distributed.initialize` (coordinator, process count, this process's id; or whatever
the cluster environment provides) followed by the ordinary trainer: its mesh spans every device of every process,
each process feeds its slice of the global batch, and process 0 alone writes logs and reports. See
docs/DISTRIBUTED.md for launching on GPU hosts and TPU pod slices.

    launch = resolve(coordinator="10.0.0.1:1234", num_processes=2, process_id=0)   # or from the environment
    initialize(launch)                                                            # before any other JAX use

`flaxvision train` runs a multi-process run under a small supervisor (`supervise`): JAX stops every process of
the run when one of them dies (its heartbeat stops), by aborting it from C++, which Python cannot catch; the
supervisor turns that into a one-line error that says what happened and how to resume.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

from flaxvision.errors import ConfigError, FlaxvisionError, PeerProcessLost

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_SUPERVISED = "FLAXVISION_SUPERVISED"  # set in the process that the supervisor runs
DEFAULT_HEARTBEAT_TIMEOUT = 100  # jax's default: a process silent this long is dead, and the run stops
DEFAULT_INIT_TIMEOUT = 300  # jax's default: how long processes wait for each other at start

# What JAX's runtime prints when it stops a process because another one died (coordination service errors).
# What JAX's runtime prints when it aborts a process because another one is gone: from the error poller, or from
# a barrier that was waiting on the dead task (e.g. Orbax finishing an asynchronous checkpoint).
_PEER_LOST_MARKERS = (
    b"distributed service detected fatal errors",
    b"Polled an error from coordination service",
    b"heartbeat timeout",
    b"CoordinationServiceAgent::SetError",
)


def lost_a_peer(exit_code: int, stderr_tail: bytes) -> bool:
    """Whether a child that ended with `exit_code` was stopped by the runtime because another process died."""
    return exit_code != 0 and any(marker in stderr_tail for marker in _PEER_LOST_MARKERS)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process run: explicit values, or None to let JAX read the cluster."""

    coordinator: str | None = None  # HOST:PORT of process 0's coordinator service
    num_processes: int | None = None
    process_id: int | None = None
    cluster: str | None = None  # the detected cluster environment when the values come from it
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT
    init_timeout: int = DEFAULT_INIT_TIMEOUT

    def describe(self) -> str:
        if self.coordinator is not None:
            return f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator}"
        return f"settings from the {self.cluster} environment"


def _int_or_none(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def detect_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
    """The multi-process cluster environment this process runs in, if one is evident from the environment.

    Only environments that say they run more than one process: a SLURM job step with several tasks, an Open MPI
    job with several ranks, a Cloud TPU pod slice whose worker list names several hosts. jax.distributed reads
    the coordinator, process count and id from them itself.
    """
    if environ.get("SLURM_JOB_ID") and (_int_or_none(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1) > 1:
        return "SLURM"
    if (_int_or_none(environ.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "Open MPI"
    if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU pod"
    return None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cluster: bool = False,
    heartbeat_timeout: int | None = None,
    init_timeout: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Launch | None:
    """Decide whether this is a multi-process run and how to join it; None means an ordinary single-process run.

    Explicit values (flags) come first, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then a
    detected cluster (see `detect_cluster`), or any cluster JAX knows when `cluster` is True (e.g. a TPU pod slice
    whose environment does not list its workers).
    """
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _int_or_none(environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _int_or_none(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    timeouts = dict(
        heartbeat_timeout=DEFAULT_HEARTBEAT_TIMEOUT if heartbeat_timeout is None else int(heartbeat_timeout),
        init_timeout=DEFAULT_INIT_TIMEOUT if init_timeout is None else int(init_timeout),
    )
    for name, value in timeouts.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 second, got {value}")
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in given.values()):
        if coordinator is None or num_processes is None or process_id is None:
            missing = [k for k, v in given.items() if v is None]
            raise ConfigError(
                f"a multi-process run needs --coordinator HOST:PORT, --num-processes N and --process-id I (or "
                f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing {', '.join(missing)}"
            )
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--coordinator must be HOST:PORT (process 0's address and a free port), got {coordinator!r}")
        if num_processes < 1:
            raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id must be in [0, {num_processes}) for {num_processes} processes, got {process_id}")
        return Launch(coordinator, num_processes, process_id, heartbeat_timeout=timeouts["heartbeat_timeout"],
                      init_timeout=timeouts["init_timeout"])  # fmt: skip
    detected = detect_cluster(environ)
    if detected or cluster:
        return Launch(cluster=detected or "cluster", heartbeat_timeout=timeouts["heartbeat_timeout"],
                      init_timeout=timeouts["init_timeout"])  # fmt: skip
    return None


def initialize(launch: Launch) -> None:
    """Start JAX's distributed runtime (call before anything else uses JAX); errors become one-line messages."""
    import jax

    kwargs: dict[str, Any] = dict(
        initialization_timeout=launch.init_timeout,
        heartbeat_timeout_seconds=launch.heartbeat_timeout,
        # a process that finished waits at most this long for the others at exit (fit ends with a barrier)
        shutdown_timeout_seconds=launch.heartbeat_timeout,
    )
    if launch.coordinator is not None:
        kwargs.update(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                      process_id=launch.process_id)  # fmt: skip
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # RuntimeError, ValueError, JaxRuntimeError (DEADLINE_EXCEEDED, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "more than once" in first or "already" in first:
            raise FlaxvisionError(f"jax.distributed is already initialised in this process ({first})") from err
        raise FlaxvisionError(
            f"cannot join the multi-process run ({launch.describe()}): {first}; check that every process "
            f"was started within {launch.init_timeout} s (--init-timeout), with the same --num-processes and the "
            "coordinator address of process 0, reachable from this host"
        ) from err


def process_count() -> int:
    import jax

    return jax.process_count()


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op in a single-process run)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order (on every process)."""
    import jax

    if jax.process_count() == 1:
        return [value]
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths.tolist())]


# ---- parameter sharding ---------------------------------------------------------------------------------------


def fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int, axis: str = "data") -> Any:
    """The PartitionSpec of one array under FSDP: its largest dimension that divides by `axis_size` is split over
    `axis` when the array has at least `min_size` elements; otherwise (and when nothing divides) replicated.

    Chosen from the shape alone, so it holds for any parameter layout (stacked layers included) and gives the
    optimizer state (moments shaped like their parameters) the same layout as its parameter.
    """
    from jax.sharding import PartitionSpec

    size = 1
    for d in shape:
        size *= d
    if axis_size > 1 and size >= min_size:
        for dim in sorted(range(len(shape)), key=lambda i: (-shape[i], i)):
            if shape[dim] >= axis_size and shape[dim] % axis_size == 0:
                return PartitionSpec(*[axis if i == dim else None for i in range(len(shape))])
    return PartitionSpec()


def state_shardings(tree: Any, mesh: Any, mode: str = "replicated", min_size: int = 2**18, axis: str = "data") -> Any:
    """A NamedSharding for every array of `tree` (e.g. a TrainState): all replicated, or FSDP (`fsdp_spec`)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    if mode == "replicated":
        return jax.tree.map(lambda _: replicated, tree)
    if mode != "fsdp":
        raise ConfigError(f"param_sharding={mode!r}: use replicated or fsdp")
    axis_size = mesh.shape[axis]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), axis_size, min_size, axis)), tree)


# ---- the supervisor -------------------------------------------------------------------------------------------


def is_supervised() -> bool:
    return os.environ.get(ENV_SUPERVISED) == "1"


def supervise(launch: Launch, *, resume_hint: str) -> int:
    """Run this same command again as a child process and wait for it; return its exit code.

    The child inherits stdin/stdout; its stderr is copied through as it comes and its tail kept, so that a child
    that JAX's runtime aborted because another process of the run died becomes `PeerProcessLost` (one clear line,
    exit code 1) instead of a C++ stack trace. SIGTERM (schedulers, `kill`) is passed on to the child; Ctrl-C
    reaches the child directly (same process group).
    """
    command = [sys.executable, *sys.orig_argv[1:]]
    child = subprocess.Popen(command, env={**os.environ, ENV_SUPERVISED: "1"}, stderr=subprocess.PIPE)
    tail: collections.deque[bytes] = collections.deque(maxlen=64)
    child_stderr = child.stderr
    if child_stderr is None:  # cannot happen with stderr=PIPE
        raise RuntimeError("the supervised child process has no stderr pipe")

    def copy_stderr() -> None:
        out = getattr(sys.stderr, "buffer", None)
        while chunk := os.read(child_stderr.fileno(), 65536):
            tail.append(chunk)
            if out is not None:
                out.write(chunk)
                out.flush()

    copier = threading.Thread(target=copy_stderr, daemon=True)
    copier.start()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda s, f: child.send_signal(signal.SIGTERM))
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child gets Ctrl-C itself
    try:
        code = child.wait()
        copier.join(timeout=10)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    text = b"".join(tail)
    if lost_a_peer(code, text):
        who = f"process {launch.process_id} of {launch.num_processes}" if launch.process_id is not None else "this process"
        raise PeerProcessLost(peer_lost_message(who, resume_hint, launch.heartbeat_timeout))
    return code if code >= 0 else 128 - code


def peer_lost_message(who: str, resume_hint: str, heartbeat_timeout: int | None = None) -> str:
    within = f" (within the heartbeat timeout, {heartbeat_timeout} s)" if heartbeat_timeout else ""
    return (
        f"the multi-process run stopped in {who}: another process died or became unreachable, and JAX's "
        f"distributed runtime stopped the others{within}; that process's log says why. The last checkpoint is "
        f"intact: {resume_hint}"
    )


def resume_hint(run_dir: Any) -> str:
    return f"once every host is up again, run the same command on every host with --run-dir {run_dir} --resume"
