"""Content-addressed cache for expensive results: JSON + npz, atomic writes, never pickle.

A key is the sha256 of the sorted JSON of exactly the inputs that determine a result, plus the
stage's algorithm version and the versions of the libraries that compute it. A corrupt or
incompatible entry is reported (a warning) and treated as a miss, never an exception.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "cache"
FORMAT = 1


def cache_dir() -> Path:
    """The cache folder: ``$MOPEQ_CACHE_DIR`` or the repository's ``cache/``."""
    return Path(os.environ.get("MOPEQ_CACHE_DIR", DEFAULT_DIR))


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics can change cached results."""
    import numpy
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__}


def make_key(stage: str, inputs: dict, version: int) -> str:
    """sha256 over the stage name, its algorithm version, library versions and inputs."""
    payload = {"stage": stage, "version": version, "format": FORMAT,
               "libs": library_versions(), "inputs": inputs}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Entry:
    """A cached result: JSON metadata and named arrays."""

    meta: dict
    arrays: dict[str, np.ndarray]


def _paths(stage: str, key: str, root: Path | None) -> tuple[Path, Path]:
    base = (root or cache_dir()) / stage
    return base / f"{key}.json", base / f"{key}.npz"


def load(stage: str, key: str, root: Path | None = None) -> Entry | None:
    """The entry for ``key``, or None if absent, corrupt or incompatible (with a warning)."""
    jpath, npath = _paths(stage, key, root)
    if not jpath.exists():
        return None
    try:
        meta = json.loads(jpath.read_text())
        if meta.get("_key") != key or meta.get("_format") != FORMAT:
            raise ValueError("key or format mismatch")
        arrays = {}
        if npath.exists():
            with np.load(npath, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        missing = set(meta.get("_arrays", [])) - set(arrays)
        if missing:
            raise ValueError(f"missing arrays {sorted(missing)}")
        return Entry(meta, arrays)
    except Exception as exc:  # noqa: BLE001 - any damage means: recompute
        warnings.warn(f"cache entry {jpath.name} is unreadable ({exc}); recomputing",
                      stacklevel=2)
        return None


def save(stage: str, key: str, meta: dict, arrays: dict[str, np.ndarray] | None = None,
         root: Path | None = None) -> None:
    """Write an entry atomically (temp file + rename); arrays first, JSON last."""
    jpath, npath = _paths(stage, key, root)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    arrays = arrays or {}
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        _atomic_write(npath, buf.getvalue())
    full = {**meta, "_key": key, "_format": FORMAT, "_arrays": sorted(arrays)}
    _atomic_write(jpath, json.dumps(full, indent=1, default=str).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
