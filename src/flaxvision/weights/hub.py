"""Where pretrained weights come from and how their bytes are read: Hub repos, local directories and files, safely.

A SOURCE is a Hugging Face Hub repo id (`google/vit-base-patch16-224`, optionally `@revision`), a local directory
(a `save_pretrained` output, a Hub snapshot) or one file (.safetensors, a sharded `.safetensors.index.json`, .npz).
A .safetensors file next to a config.json is read with that config; alone (a bare file) from its shapes.
The Hub is reached only through huggingface_hub, so its cache, revisions, tokens and `HF_HUB_OFFLINE` apply.

Reading is safe by default: safetensors, and NumPy archives with allow_pickle=False. Pickled PyTorch files
(.bin/.pth/.pt) can run arbitrary code when loaded; they are refused unless the caller passes allow_pickle=True.
Malformed files are one FlaxvisionError each: a corrupt header or archive, a member claiming more bytes than it
holds, a shard outside its directory, a config.json value of the wrong JSON type (`CONFIG_KEYS`). Float tensors
are read as float32 (float16 and bfloat16 cast up); integer and bool tensors are kept as they are, so
that the loader can refuse them by name instead of casting them silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from flaxvision.errors import FlaxvisionError
from flaxvision.weights.config_json import check_config_json, short

SUPPORTED = (
    "a Hugging Face Hub repo id (org/name[@revision]), a directory holding model.safetensors "
    "(or model.safetensors.index.json, or one .npz), or a .safetensors / .npz file"
)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Files a snapshot needs; pickled weights only when the caller accepted them.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.npz"]
_REPO_ID = re.compile(r"^(hf-hub:)?[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")

CONVERT_HINT = (
    "convert it once with `import torch, safetensors.torch; sd = torch.load(PATH, map_location='cpu', weights_only=True); "
    "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')` "
    "(or transformers' `model.save_pretrained(dir, safe_serialization=True)`), or pass allow_pickle=True "
    "(--allow-pickle) if you trust the file"
)


@dataclasses.dataclass
class WeightFiles:
    """The raw content of pretrained weights: tensors as NumPy arrays plus whatever config files came with it.

    Attributes:
      origin: what the user passed (for messages).
      files: the weight files read, in order.
      tensors: tensor name -> array, in the file's own naming and layout; float tensors as float32, others
        (integer, bool: BatchNorm's num_batches_tracked, or a broken file) in their own dtype.
      config: config.json as a dict (None for bare files).
      preprocessor: preprocessor_config.json (transformers) as a dict, when present.
      metadata: the safetensors header metadata (str -> str), merged over shards.
    """

    origin: str
    files: tuple[Path, ...]
    tensors: dict[str, np.ndarray]
    config: dict[str, Any] | None = None
    preprocessor: dict[str, Any] | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


def split_revision(source: str, revision: str | None) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); an explicit `revision` argument wins over the suffix."""
    repo_id = source.removeprefix("hf-hub:")
    if "@" in repo_id:
        repo_id, suffix = repo_id.split("@", 1)
        revision = revision or suffix
    return repo_id, revision


def download(
    source: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    allow_pickle: bool = False,
) -> Path:
    """The local snapshot directory of a Hub repo (downloaded, or from the cache when offline)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    repo_id, revision = split_revision(source, revision)
    patterns = HUB_PATTERNS + ([f"*{s}" for s in PICKLE_SUFFIXES] if allow_pickle else [])
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=patterns
        )
    except errors.GatedRepoError:
        raise FlaxvisionError(
            f"Hub repo '{repo_id}' is gated; accept its terms on huggingface.co, then log in (`hf auth login`) or pass token="
        ) from None
    except errors.RepositoryNotFoundError:
        raise FlaxvisionError(
            f"no model repo '{repo_id}' on the Hugging Face Hub and no such local path; check the name, "
            "or log in (`hf auth login`) / pass token= if it is private"
        ) from None
    except errors.RevisionNotFoundError:
        raise FlaxvisionError(f"revision '{revision}' does not exist in Hub repo '{repo_id}'; use a branch, tag or commit of it") from None
    except errors.LocalEntryNotFoundError as err:
        incomplete = type(err).__name__ == "IncompleteSnapshotError"
        reason = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "no connection"
        cache = cache_dir or constants.HF_HUB_CACHE
        if incomplete:
            raise FlaxvisionError(
                f"the cached snapshot of {where} in {cache} is incomplete and the Hub cannot be reached ({reason}); "
                "finish the download on a connected machine or pass a local directory"
            ) from None
        raise FlaxvisionError(
            f"cannot reach the Hugging Face Hub to fetch {where} and it is not in the cache {cache} ({reason}); "
            f"download it on a connected machine (`hf download {repo_id}`) and copy the cache, or pass a local directory"
        ) from None
    except errors.HFValidationError as err:
        raise FlaxvisionError(f"{source!r} is neither an existing path nor a valid Hub repo id ({err}); pass {SUPPORTED}") from None
    except (errors.HfHubHTTPError, OSError) as err:
        raise FlaxvisionError(f"the Hugging Face Hub failed to serve {where}: {err}; retry, or pass a local directory") from None
    return Path(path)


def resolve(source: str | Path, **hub_kwargs: Any) -> Path:
    """A local path for SOURCE: the path itself when it exists, else the Hub snapshot directory."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.endswith((".safetensors", ".npz", ".json", *PICKLE_SUFFIXES)) or text.startswith((".", "/", "~")):
        raise FlaxvisionError(f"no such file or directory: '{text}'; pass {SUPPORTED}")
    if not _REPO_ID.match(text):
        raise FlaxvisionError(f"{text!r} is neither an existing path nor a Hub repo id; pass {SUPPORTED}")
    return download(text, **hub_kwargs)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FlaxvisionError(f"cannot read '{path}': not valid JSON ({err}); re-download or fix the file") from None
    if not isinstance(data, dict):
        raise FlaxvisionError(f"'{path}' should hold a JSON object, found {type(data).__name__}")
    return data


# safetensors dtypes NumPy reads itself, and bfloat16 read through JAX and cast up (float8 and the rest: refused).
NUMPY_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64", "C64"}
JAX_FLOAT_DTYPES = {"BF16"}


def _as_float32(array: np.ndarray) -> np.ndarray:
    """Float arrays as float32 (float16 and float64 too); others unchanged, for the loader to refuse by name."""
    if array.dtype.kind != "f" or array.dtype == np.float32:
        return array
    return np.asarray(array, dtype=np.float32)


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (floats as float32 NumPy) and header metadata of one .safetensors file."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype in JAX_FLOAT_DTYPES:  # NumPy has no bfloat16: read through JAX
                    with safe_open(str(path), framework="flax") as fj:
                        tensors[key] = np.asarray(fj.get_tensor(key).astype("float32"))
                elif dtype in NUMPY_DTYPES:
                    tensors[key] = _as_float32(f.get_tensor(key))
                else:
                    raise FlaxvisionError(
                        f"cannot read '{path}': tensor {key} has dtype {dtype}, which flaxvision does not read; "
                        "save it as float32, float16 or bfloat16"
                    )
    except (SafetensorError, OSError, ValueError, OverflowError, MemoryError) as err:
        if isinstance(err, FlaxvisionError):
            raise
        raise FlaxvisionError(
            f"cannot read '{path}': not a valid safetensors file, probably truncated or corrupt ({err}); re-download it"
        ) from None
    return tensors, metadata


def read_npz(path: Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Arrays of a NumPy .npz archive (big_vision / vision_transformer weights), read without pickle.

    Each member's .npy header is read first: an object array (pickle) is refused unless allowed, and a member
    whose header claims more bytes than the member holds is refused before anything is allocated.
    """
    arrays: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":
                raise _corrupt_npz(path, "it is not a zip archive")
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                for info in archive.infolist():
                    key = info.filename.removesuffix(".npy")
                    if key == info.filename or key in arrays:
                        raise _corrupt_npz(path, f"member {info.filename!r} is not one .npy array")
                    with archive.open(info) as member:
                        arrays[key] = _read_member(path, key, member, info.file_size, allow_pickle)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, OverflowError, MemoryError) as err:
        if isinstance(err, FlaxvisionError):
            raise
        raise _corrupt_npz(path, err) from None
    return arrays


def _read_member(path: Path, key: str, member: Any, size: int, allow_pickle: bool) -> np.ndarray:
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(member)
    if dtype.hasobject and not allow_pickle:
        raise FlaxvisionError(
            f"'{path}' stores pickled Python objects ({key}), which can run arbitrary code; pass allow_pickle=True if you trust it"
        )
    if not dtype.hasobject and math.prod(shape) * dtype.itemsize > size:
        raise _corrupt_npz(path, f"{key} claims shape {shape} of {dtype}, more than its {size} bytes")
    member.seek(0)
    return _as_float32(np.lib.format.read_array(member, allow_pickle=allow_pickle))


def _corrupt_npz(path: Path, err: Any) -> FlaxvisionError:
    return FlaxvisionError(f"cannot read '{path}': not a valid .npz archive, probably truncated or corrupt ({err}); re-download it")


def read_pickle(path: Path) -> dict[str, np.ndarray]:
    """A pickled PyTorch state dict, with torch imported only now. Callers check allow_pickle first."""
    try:
        import torch
    except ImportError:
        raise FlaxvisionError(f"reading the pickled weights '{path}' needs PyTorch: pip install 'flaxvision[verify]'") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # the caller opted in: trusted file
    except Exception as err:  # torch raises many types for bad pickles
        raise FlaxvisionError(f"cannot read '{path}': not a loadable PyTorch file ({type(err).__name__}: {err})") from None
    for wrapper in ("state_dict", "model", "module"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise FlaxvisionError(f"'{path}' holds a {type(state).__name__}, not a state dict of tensors")
    # Floats as float32; integer and bool tensors as they are (the loader refuses them where a float belongs).
    return {
        k: _as_float32((v.float() if v.is_floating_point() else v).detach().cpu().numpy())
        for k, v in state.items()
        if hasattr(v, "detach")
    }


def _refuse_pickle(path: Path) -> FlaxvisionError:
    return FlaxvisionError(
        f"'{path}' is a pickled PyTorch file, which can run arbitrary code when loaded, so flaxvision does not "
        f"read it by default; {CONVERT_HINT}"
    )


def weight_files(directory: Path, allow_pickle: bool) -> tuple[Path, ...]:
    """The weight file(s) of a weights directory, safest format first; shards come from their index."""
    def one_of(pattern: str) -> list[Path]:
        return sorted(p for p in directory.glob(pattern) if p.is_file())

    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (directory / name).is_file():
            return _expand_index(directory / name)
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.npz"):
        found = one_of(pattern)
        if len(found) == 1:
            return _expand_index(found[0])
        if len(found) > 1:
            raise FlaxvisionError(
                f"'{directory}' holds several weight files ({', '.join(p.name for p in found)}); pass the one to load"
            )
    pickles = [p for s in PICKLE_SUFFIXES for p in one_of(f"*{s}")] + one_of("*.bin.index.json")
    if pickles:
        if not allow_pickle:
            raise _refuse_pickle(pickles[0])
        index = [p for p in pickles if p.name.endswith(".index.json")]
        return _expand_index(index[0]) if index else (pickles[0],)
    present = ", ".join(sorted(p.name for p in directory.iterdir())[:8]) or "nothing"
    raise FlaxvisionError(f"no weights found in '{directory}' (it holds {present}); flaxvision reads {SUPPORTED}")


def _expand_index(path: Path) -> tuple[Path, ...]:
    """Shard files named by a `*.index.json` weight map, or the file itself."""
    if not path.name.endswith(".index.json"):
        return (path,)
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FlaxvisionError(f"'{path}' has no weight_map; it is not the index of sharded weights")
    strays = [name for name in weight_map.values() if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")]
    if strays:
        raise FlaxvisionError(f"'{path}': weight_map names {short(strays[0])}, not a file next to the index; fix or re-download it")
    shards = tuple(path.parent / name for name in dict.fromkeys(weight_map.values()))
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise FlaxvisionError(f"'{path}' names shards that are missing: {', '.join(missing)}; download all the shards")
    return shards


def read_tensors(files: tuple[Path, ...], allow_pickle: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of the given weight files (several for shards) and their merged safetensors metadata."""
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            part, meta = read_safetensors(path)
            metadata.update(meta)
        elif suffix == ".npz":
            part = read_npz(path, allow_pickle)
        elif suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise _refuse_pickle(path)
            part = read_pickle(path)
        else:
            raise FlaxvisionError(f"unknown weights format '{path.name}'; flaxvision reads {SUPPORTED}")
        clash = set(part) & set(tensors)
        if clash:
            raise FlaxvisionError(f"shard '{path}' repeats tensor(s) {', '.join(sorted(clash)[:5])} of an earlier shard")
        tensors.update(part)
    return tensors, metadata


def read_weights(source: str | Path, *, allow_pickle: bool = False, **hub_kwargs: Any) -> WeightFiles:
    """Resolve SOURCE (Hub, directory or file) and read its tensors and config files.

    Args:
      source: see the module docstring.
      allow_pickle: read pickled PyTorch files (.bin/.pth) with torch.load; only for files you trust.
      **hub_kwargs: revision, token, cache_dir for Hub sources.
    """
    path = resolve(source, allow_pickle=allow_pickle, **hub_kwargs)
    if path.is_dir():
        files, directory = weight_files(path, allow_pickle), path
    elif path.name.endswith(".index.json"):
        files, directory = _expand_index(path), path.parent
    elif path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        files, directory = (path,), path.parent  # a weight file inside a weights directory: use its config
    elif path.suffix.lower() == ".npz":
        files, directory = (path,), None  # Google's .npz files have no config.json
    else:
        raise FlaxvisionError(f"unknown weights format '{path.name}'; flaxvision reads {SUPPORTED}")
    config = preprocessor = None
    if directory is not None and (directory / "config.json").is_file():
        config = _read_json(directory / "config.json")
        check_config_json(config, directory / "config.json")
        if (directory / "preprocessor_config.json").is_file():
            preprocessor = _read_json(directory / "preprocessor_config.json")
            check_config_json(preprocessor, directory / "preprocessor_config.json")
    tensors, metadata = read_tensors(files, allow_pickle)
    if not tensors:
        raise FlaxvisionError(f"'{files[0]}' holds no tensors; it is not a weights file")
    return WeightFiles(str(source), files, tensors, config, preprocessor, metadata)
