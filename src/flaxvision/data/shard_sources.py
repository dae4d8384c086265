"""Which dataset specs are sharded, and their splits as `RawSplit`s read in place (data/shards.py).

The spec syntax (the same `--dataset` takes for every other kind; what is not matched here goes on to
`sources.resolve_kind`):

    DIR or URL with manifest.json          a `flaxvision data pack` directory: wds or arrayrecord shards, its splits
    PATTERN.tar                            WebDataset shards: braces {000..099} / {a,b} and globs, local or remote;
                                           several patterns comma-separated; the split of each file from its name
                                           (train / val / validation / test, else train)
    DIR holding .tar files                 the same for every .tar below DIR
    parquet file(s) / DIR / Hub id with streaming=True (--streaming)
                                           the parquet files read in place (Hub: its parquet files through hf://)
"""

from __future__ import annotations

import os
from pathlib import Path

from flaxvision.data import shard_index, shards
from flaxvision.data.image_source import RawSplit
from flaxvision.errors import FlaxvisionError


def sharded_kind(spec: str) -> str | None:
    """"manifest", "wds", "parquet" (remote parquet files: read in place, as with --streaming) or None."""
    if shards.is_remote(spec):
        return "wds" if ".tar" in spec else "parquet" if ".parquet" in spec else "manifest"
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if (path / shards.MANIFEST).is_file():
            return "manifest"
        if next(path.rglob("*.tar"), None) is not None and next(path.rglob("*.parquet"), None) is None:
            return "wds"
        return None
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return "wds" if parts and all(p.endswith(".tar") for p in parts) else None


def open_sharded(spec: str, kind: str, *, image_column: str | None = None, label_column: str | None = None,
                 log: list[str] | None = None) -> dict[str, RawSplit]:  # fmt: skip
    """{split: RawSplit} of a sharded spec of this kind ("manifest", "wds", "parquet" or "hub" streamed); `log`
    collects warnings about damaged shards found while indexing."""
    if kind == "manifest":
        return shard_index.read_manifest(spec if shards.is_remote(spec) else os.path.expanduser(spec))
    files = _files(spec, kind)
    by_split: dict[str, list[str]] = {}
    root = spec if kind != "hub" and Path(os.path.expanduser(spec)).is_dir() else None
    for f in files:
        name = os.path.relpath(f, os.path.expanduser(root)) if root and not shards.is_remote(f) else f.rsplit("/", 1)[-1]
        by_split.setdefault(shard_index.split_of(name), []).append(f)
    out: dict[str, RawSplit] = {}
    names: tuple[str, ...] | None = None
    for split, paths in by_split.items():
        if kind == "wds":
            raw, warnings = shard_index.scan_tars(paths)
            (log if log is not None else []).extend(warnings)
        else:
            raw = shard_index.parquet_shards(paths, image_column, label_column, log)
        out[split] = raw
        names = names if names and len(names) >= len(raw.class_names) else raw.class_names
    # One class list for all splits (a split that lacks the highest classes must not shorten it).
    return {split: RawSplit(r.images, r.labels, names or r.class_names) for split, r in out.items()}


def _files(spec: str, kind: str) -> list[str]:
    if kind == "hub":
        return _hub_parquet(spec)
    path = Path(os.path.expanduser(spec))
    suffix = ".tar" if kind == "wds" else ".parquet"
    if not shards.is_remote(spec) and path.is_dir():
        found = sorted(str(p) for p in path.rglob(f"*{suffix}"))
        if not found:
            raise FlaxvisionError(f"{spec} holds no {suffix} files; pass the directory of the shards")
        return found
    found = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        found += shards.resolve_shards(os.path.expanduser(part) if not shards.is_remote(part) else part)
    return found


def _hub_parquet(repo_id: str) -> list[str]:
    """The parquet files of a Hub dataset, as hf:// URLs: its own, else those of the Hub's parquet conversion."""
    from flaxvision.data.hf_datasets import _offline

    if _offline():
        raise FlaxvisionError(f"streaming Hub dataset {repo_id!r} needs the Hub, and offline mode is on (HF_HUB_OFFLINE / "
                              "HF_DATASETS_OFFLINE); unset it, or stream a local copy of its parquet files")  # fmt: skip
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    try:
        for root in (f"datasets/{repo_id}", f"datasets/{repo_id}@refs%2Fconvert%2Fparquet"):
            found = sorted(fs.glob(f"{root}/**/*.parquet"))
            if found:
                return [f"hf://{f}" for f in found]
    except Exception as err:
        raise FlaxvisionError(f"cannot list the parquet files of Hub dataset {repo_id!r}: {type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0]}") from None  # fmt: skip
    raise FlaxvisionError(f"Hub dataset {repo_id!r} has no parquet files to stream; load it without --streaming")
