"""`flaxvision push`: a finished run's model, with its model card, to a Hugging Face Hub repo (huggingface_hub).

The folder uploaded: the weights in one layout (transformers: config.json, preprocessor_config.json,
model.safetensors; timm: config.json with the label names, model.safetensors; flaxvision: config.json,
model.safetensors), README.md (the model card, `flaxvision.ship.card`) and flaxvision_run/ (the run's config.json,
summary.json, eval.json, metrics.jsonl: the recipe `flaxvision train --from-config` re-runs). `--dry-run DIR`
writes exactly that folder and stops, with no network.

Everything is checked before any network call or file write: a finished run, a valid repo id, a layout that can
hold the model; then HF_HUB_OFFLINE, the token (huggingface_hub.get_token() or --token) and whoami. Each failure is
one line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from flaxvision.errors import FlaxvisionError

EPILOG = """examples:
  flaxvision push runs/food me/vit-food20                       # transformers layout, public, branch main
  flaxvision push runs/food me/vit-food20 --private --revision v1
  flaxvision push runs/deit me/deit-food --weights ema --format timm
  flaxvision push runs/food me/vit-food20 --dry-run upload/     # write the folder that would be uploaded; no network

Log in once with `hf auth login` (or set HF_TOKEN, or pass --token)."""

TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment flag


def add_parser(sub: argparse._SubParsersAction) -> None:
    from flaxvision.ship.card import LAYOUTS

    parser = sub.add_parser(
        "push",
        help="upload a run's model and its model card to the Hugging Face Hub",
        epilog=EPILOG,
        description="Upload the model of a finished run (weights, preprocessing, labels, README.md model card) to a Hub repo.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN_DIR", help="a finished run directory")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repo, OWNER/NAME (created when new)")
    parser.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)"
    )
    parser.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created from main when new)")
    parser.add_argument(
        "--format",
        choices=list(LAYOUTS),
        help="the weights' layout (default: the first of transformers, timm, flaxvision that holds the model)",
    )
    parser.add_argument(
        "--weights",
        choices=("raw", "ema"),
        default="raw",
        help="a run trained with --ema-decay: its raw weights (default) or their EMA",
    )
    parser.add_argument(
        "--token", help="a Hub token with write access (default: the one `hf auth login` saved, or HF_TOKEN)"
    )
    parser.add_argument(
        "--commit-message", metavar="TEXT", help="the commit message (default: names the run and the layout)"
    )
    parser.add_argument(
        "--dry-run",
        metavar="DIR",
        type=Path,
        help="write the folder that would be uploaded to DIR (new or empty) and stop: no network",
    )
    parser.add_argument("--overwrite", action="store_true", help="with --dry-run: replace what DIR holds")
    parser.set_defaults(func=run)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise FlaxvisionError(
            f"REPO_ID {repo_id!r} is not a valid Hub repo id ({str(err).splitlines()[0]}); "
            "pass OWNER/NAME, e.g. me/vit-food20"
        ) from None


def check_run(run: Path, weights: str) -> None:
    from flaxvision.ship.card import read_run

    read_run(run)  # a finished run (config.json and summary.json), or one line
    model_dir = run / ("model_ema" if weights == "ema" else "model")
    if not model_dir.is_dir():
        hint = "trained with --ema-decay; drop --weights ema" if weights == "ema" else "it may have been removed"
        raise FlaxvisionError(f"{run} has no {model_dir.name}/ (the model to push); {hint}")


def check_dry_run_dir(out: Path, run: Path, overwrite: bool) -> None:
    target, source = out.resolve(), run.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise FlaxvisionError(
            f"--dry-run {out} is the run directory {run} (or inside or above it); choose another directory"
        )
    if out.exists() and not out.is_dir():
        raise FlaxvisionError(f"--dry-run {out} is a file; pass a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FlaxvisionError(
            f"--dry-run {out} already exists and is not empty; choose a new directory or pass --overwrite"
        )


def hub_token(given: str | None) -> str:
    from huggingface_hub import get_token

    token = given or get_token()
    if not token:
        raise FlaxvisionError("no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token")
    return token


def default_layout(config: Any) -> str:
    """The first Hub-loadable layout (transformers, timm, flaxvision) that holds `config`."""
    from flaxvision.ship.card import LAYOUTS
    from flaxvision.weights.layouts import export_formats

    return next(f for f in export_formats(config) if f in LAYOUTS)


def hub_failure(err: Exception, doing: str, repo_id: str) -> FlaxvisionError:
    """One line for a failed Hub call: a refused token, a missing permission, another answer, or no connection."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return FlaxvisionError(
                f"the Hub refused the token while {doing} (401 Unauthorized); log in again with "
                "`hf auth login`, or pass a valid --token"
            )
        if status == 403:
            return FlaxvisionError(
                f"the token may not write to {repo_id} (403 Forbidden) while {doing}; use a token with "
                "write access to that namespace"
            )
        return FlaxvisionError(f"the Hub answered {status} while {doing}: {first}")
    return FlaxvisionError(
        f"cannot reach the Hub at {constants.ENDPOINT} while {doing} ({type(err).__name__}: {first}); "
        "check the network, or write the folder with --dry-run DIR"
    )


def write_folder(folder: Path, model: Any, run: Path, *, layout: str, repo_id: str, weights: str) -> None:
    """The folder to upload: the weights in `layout`, README.md (the model card) and flaxvision_run/ (the records)."""
    from flaxvision.files import write_atomic
    from flaxvision.ship.card import RECORDS, RECORDS_DIR, model_card
    from flaxvision.weights import save_pretrained

    save_pretrained(model, folder, format=layout)
    write_atomic(folder / "README.md", model_card(run, layout=layout, repo_id=repo_id, weights=weights))
    (folder / RECORDS_DIR).mkdir()
    for name in RECORDS:
        if (run / name).is_file():
            shutil.copyfile(run / name, folder / RECORDS_DIR / name)


def upload(folder: Path, args: argparse.Namespace, token: str, layout: str) -> str:
    """create_repo (exist_ok), create_branch for a new --revision, upload_folder; the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    step = "creating the repo"
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        if args.revision and args.revision != "main":
            step = f"creating branch {args.revision}"
            api.create_branch(args.repo_id, branch=args.revision, exist_ok=True, repo_type="model")
        step = "uploading"
        message = (
            args.commit_message or f"flaxvision push: {Path(args.run).name} ({layout} layout, {args.weights} weights)"
        )
        info: Any = api.upload_folder(
            repo_id=args.repo_id, folder_path=folder, repo_type="model", revision=args.revision, commit_message=message
        )
    except (
        Exception
    ) as err:  # any failure of the network step is one line (the folder stays local, nothing half-done here)
        raise hub_failure(err, step, args.repo_id) from None
    return str(getattr(info, "commit_url", None) or info)


def run(args: argparse.Namespace) -> int:
    import tempfile

    from flaxvision import files

    run_dir = Path(args.run)
    check_run(run_dir, args.weights)
    check_repo_id(args.repo_id)
    if args.dry_run is not None:
        check_dry_run_dir(args.dry_run, run_dir, args.overwrite)
        token = None
    else:
        if offline():
            raise FlaxvisionError(
                "HF_HUB_OFFLINE=1 is set and push needs the Hub: unset HF_HUB_OFFLINE, or write the folder "
                "that would be uploaded with --dry-run DIR"
            )
        token = hub_token(args.token)

    from flaxvision.commands.common import load_model
    from flaxvision.weights.layouts import writer

    model = load_model(str(run_dir), weights=args.weights, nonfinite="error")  # NaN/Inf weights are not uploaded
    layout = args.format or default_layout(model.config)
    writer(layout, model.config)  # the layout can hold the model, or one line naming those that can

    if args.dry_run is not None:
        with files.atomic_directory(args.dry_run, overwrite=True) as tmp:
            write_folder(tmp, model, run_dir, layout=layout, repo_id=args.repo_id, weights=args.weights)
        print(
            f"flaxvision: wrote the folder for {args.repo_id} ({layout} layout) to {args.dry_run}; nothing was uploaded"
        )
        return 0

    from huggingface_hub import HfApi

    assert token is not None
    try:
        who = HfApi(token=token).whoami()
    except Exception as err:
        raise hub_failure(err, "checking the token (whoami)", args.repo_id) from None
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise FlaxvisionError(
            f"the token of {who.get('name')} is read-only; create a write token (hf auth login) or pass --token"
        )
    with tempfile.TemporaryDirectory(prefix="flaxvision-push-") as tmp:
        write_folder(Path(tmp), model, run_dir, layout=layout, repo_id=args.repo_id, weights=args.weights)
        url = upload(Path(tmp), args, token, layout)
    print(f"flaxvision: pushed {run_dir} ({layout} layout) to {args.repo_id}: {url}", file=sys.stdout)
    return 0
