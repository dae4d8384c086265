"""`flaxvision train`: a preset (or the built-in offline default) with any field overridden on the command line."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from flaxvision.errors import ConfigError

EPILOG = """examples:
  flaxvision train                                        # the offline default run
  flaxvision train --preset food101-vit-b16-sgd           # the ViT tutorial's recipe
  flaxvision train --preset food101-vit-b16-sgd --epochs 1 --lr 3e-4 --batch-size 64
  flaxvision train --preset mnist-cnn --run-dir runs/mnist --resume
  flaxvision train --model resnet18_cifar --dataset uoft-cs/cifar10 --val-split test --augment cifar
  flaxvision train --dataset ./my_images --model vit_small_patch16_224 --pretrained timm/vit_small_patch16_224.augreg_in21k_ft_in1k --train-only head
  flaxvision train --preset mnist-cnn --run-dir /shared/runs/mnist --coordinator host0:1234 --num-processes 2 --process-id 0
  flaxvision train --preset food101-vit-b16-adamw --run-dir /shared/runs/vit --param-sharding fsdp   # on every host

Every field of the recipe is an option (--lr, --batch-size, --warmup-steps, --freeze REGEX, --dtype bfloat16, ...);
`flaxvision presets` lists the presets with the results their sources report. Several processes (GPU hosts, a TPU
pod slice): docs/DISTRIBUTED.md."""


# Recipe fields whose --help says more than their default.
FIELD_HELP = {"log_to": "also log metrics, the recipe and the report's figures to experiment trackers: any of "
                        "tensorboard, wandb, mlflow, comma-separated (in the run directory: wandb offline, MLflow's "
                        "store under mlruns/, unless WANDB_MODE / MLFLOW_TRACKING_URI say otherwise; "
                        "pip install 'flaxvision[tracking]') "}  # fmt: skip
FIELD_METAVARS = {"log_to": "TRACKERS"}


def _parse_none(kind: type) -> Any:
    def parse(text: str) -> Any:
        if text.lower() in ("none", "null"):
            return None
        if kind is dict:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 6}}', got {text!r}") from None
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
            return value
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flaxvision.train.config import TrainConfig, field_types

    parser = sub.add_parser(
        "train", help="train or fine-tune a model (no arguments: the built-in offline default)",
        description="Train with a preset recipe, overriding any of its fields.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--preset", help="a recipe from `flaxvision presets` (default: the offline default run)")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: runs/<preset>-<date>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its newest intact checkpoint, with the recipe in its "
                             "config.json (a finished run: nothing to do)")  # fmt: skip
    parser.add_argument("--allow-changes", action="store_true",
                        help="with --resume: accept recipe options that differ from the run's config.json (recorded there)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --run-dir holds and start afresh (after the recipe has been checked)")
    parser.add_argument("--from-config", type=Path, metavar="CONFIG_JSON", help="re-run the recipe of a run's config.json")
    multi = parser.add_argument_group(
        "multi-process runs (JAX's distributed runtime; see docs/DISTRIBUTED.md)",
        "Start the same command on every host. Without these flags, JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
        "JAX_PROCESS_ID are read, and a SLURM job step / Open MPI job / TPU pod slice with several processes is "
        "detected.",
    )
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address and a free port")
    multi.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (usually one per host)")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0 .. N-1")
    multi.add_argument("--distributed", action="store_true",
                       help="join a multi-process run described by the cluster environment (jax.distributed.initialize() "
                            "with no arguments: TPU pod slices, SLURM, Open MPI, Kubernetes)")  # fmt: skip
    multi.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                       help="a process silent this long is dead and the whole run stops (default 100)")  # fmt: skip
    multi.add_argument("--init-timeout", type=int, metavar="SECONDS",
                       help="how long processes wait for each other at start (default 300)")  # fmt: skip
    recipe = parser.add_argument_group("recipe fields (override the preset)")
    defaults = TrainConfig()
    for name, kind in field_types().items():
        flag = "--" + name.replace("_", "-")
        # SUPPRESS: a field is an override exactly when it was typed (even as "none").
        if kind is bool:
            recipe.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"(default {getattr(defaults, name)})")  # fmt: skip
        else:
            recipe.add_argument(flag, dest=name, type=_parse_none(kind), default=argparse.SUPPRESS,
                                metavar=FIELD_METAVARS.get(name, kind.__name__.upper()),
                                help=FIELD_HELP.get(name, "") + f"(default {getattr(defaults, name)!r})")  # fmt: skip
    parser.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> tuple[str, Any]:
    """(run name, TrainConfig) from --preset / --from-config (with --resume and neither: the run's own config.json)
    and the field overrides typed on the command line."""
    from flaxvision.presets import DEFAULT_PRESET, get_preset
    from flaxvision.train.config import TrainConfig, field_types

    run_dir: Path | None = args.run_dir
    saved = run_dir / "config.json" if args.resume and run_dir is not None else None
    if args.from_config:
        name, config = args.from_config.parent.name, TrainConfig.from_file(args.from_config)
    elif args.preset is None and saved is not None and saved.is_file():
        name, config = saved.parent.name, TrainConfig.from_file(saved)  # resume the recipe the run was started with
    else:
        name = args.preset or DEFAULT_PRESET
        config = get_preset(name)
    overrides = {k: getattr(args, k) for k in field_types() if hasattr(args, k)}
    if "model" in overrides and config.model_overrides and "model_overrides" not in overrides and not args.resume:
        # Overrides written for the recipe's architecture (a patch size, a width) are not the model the user named.
        print(f"flaxvision: note: dropped the {name} recipe's model_overrides {json.dumps(config.model_overrides)} "
              f"(written for its {config.model}): --model {overrides['model']} is the registry's model; pass "
              "--model-overrides to change it")  # fmt: skip
        overrides["model_overrides"] = {}
    return name, config.replace(**overrides)


def command_line(args: argparse.Namespace) -> str:
    """This `flaxvision train` invocation as one shell line, rebuilt from the parsed options (argparse keeps no
    argv): the preset or --from-config, --run-dir, the run-mode flags and every recipe field typed on the command
    line (only typed fields are in `args`), each value written so that it parses back to the same value."""
    from flaxvision.train.config import field_types

    argv = ["flaxvision", "train"]
    for flag, value in (("--preset", args.preset), ("--from-config", args.from_config), ("--run-dir", args.run_dir)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [flag for flag, on in (("--resume", args.resume), ("--allow-changes", args.allow_changes),
                                   ("--overwrite", args.overwrite)) if on]  # fmt: skip
    for name, kind in field_types().items():
        if not hasattr(args, name):
            continue
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if kind is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            argv += [flag, "none"]
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else repr(value) if isinstance(value, float) else str(value)]
    return shlex.join(argv)


def run(args: argparse.Namespace) -> int:
    from flaxvision import distributed

    if args.resume and args.run_dir is None:
        raise ConfigError("--resume needs --run-dir, the directory of the run to continue")
    if args.allow_changes and not args.resume:
        raise ConfigError("--allow-changes goes with --resume (it accepts recipe changes when a run continues)")
    name, config = resolve_config(args)
    launch = distributed.resolve(
        args.coordinator, args.num_processes, args.process_id, cluster=args.distributed,
        heartbeat_timeout=args.heartbeat_timeout, init_timeout=args.init_timeout,
    )  # fmt: skip
    if launch is not None:
        if args.run_dir is None:
            raise ConfigError("a multi-process run needs --run-dir: one directory that every process reaches "
                              "(on several hosts, a shared filesystem such as NFS or a GCS FUSE mount)")  # fmt: skip
        if not distributed.is_supervised():  # run the training in a child whose abort becomes a clear error
            return distributed.supervise(launch, resume_hint=distributed.resume_hint(args.run_dir))
        distributed.initialize(launch)  # before anything else touches JAX
        try:
            return _train(args, name, config, launch)
        except distributed.PeerProcessLost as err:
            # The CLI exits at once (os._exit): a normal exit would wait at jax.distributed's shutdown barrier for
            # the lost process, then abort with a second report of the same failure.
            err.hard_exit = True  # type: ignore[attr-defined]
            raise
    return _train(args, name, config, launch)


def _train(args: argparse.Namespace, name: str, config: Any, launch: Any) -> int:
    import jax

    from flaxvision.train import fit
    from flaxvision.train.session import COMMAND

    run_dir = args.run_dir or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    is_main = jax.process_index() == 0
    if is_main:
        where = f" on {jax.process_count()} processes, {jax.device_count()} devices" if launch is not None else ""
        print(f"flaxvision: training {config.model or config.pretrained} -> {run_dir}{where}")
    token = COMMAND.set(command_line(args))  # recorded in summary.json
    try:
        result = fit(config, run_dir=run_dir, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes)
    finally:
        COMMAND.reset(token)
    if not is_main or result.already_finished:
        return 0
    s = result.summary
    acc = s["final_val_accuracy"]
    print(
        f"flaxvision: done in {s['wall_seconds']:.0f} s: {s['steps']} steps, "
        + (f"val top-1 {acc:.4f} (best {s['best_val_accuracy']:.4f}), " if acc is not None else "")
        + f"{s['train_images_per_second']:.0f} train images/s; run directory {run_dir}"
    )
    return 0
