"""Load a model and its processor: the embedded default, a local folder, or a hub id.

``trust_remote_code`` is off unless the caller turns it on. Every loaded model carries a
stable fingerprint (a sha256 of its config and weights, or of the hub revision) that keys the
cache of expensive results.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mopeq.core.errors import MopeqError

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_DIR = REPO_ROOT / "assets" / "tiny-moe-vlm"
EMBEDDED = "embedded"


def embedded_dir() -> Path:
    """Where the embedded model lives (``$MOPEQ_EMBEDDED_DIR`` overrides ``assets/``)."""
    return Path(os.environ.get("MOPEQ_EMBEDDED_DIR", EMBEDDED_DIR))


# Architectures mopeq implements itself (no remote code), by config.json ``model_type``: the
# module's ``supports(config_dict)`` says whether it loads a folder, ``load(path, dtype)``
# returns (model, processor) and ``meta_model(path)`` builds it from the config alone.
# Used even when config.json has an auto_map. A module without ``supports`` loads every folder
# of its model_type.
NATIVE_ARCHS: dict[str, str] = {
    "molmo": "mopeq.model.archs.molmoe_weights",  # MolmoE-1B: allenai/MolmoE-1B-0924
    "deepseek_vl_v2": "mopeq.model.archs.deepseek_vl2",  # deepseek-ai/deepseek-vl2(-tiny|-small)
}
# What to tell a user whose remote code failed, by model_type.
NATIVE_HINTS: dict[str, str] = {
    "molmo": "mopeq supports MolmoE-1B (allenai/MolmoE-1B-0924) natively: load it without "
             "--trust-remote-code",
}


class ModelLoadError(MopeqError):
    """A model source could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    """A model ready for analysis, with what is needed to run and identify it."""

    model: nn.Module
    processor: Any  # a processor or tokenizer, or None
    fingerprint: str
    source: str
    kind: str  # "tiny_vlm" | "causal_lm" | "vlm"
    path: Path | None = None


def load_model(source: str = EMBEDDED, trust_remote_code: bool = False,
               dtype: torch.dtype = torch.float32, revision: str | None = None) -> LoadedModel:
    """Load ``"embedded"``, a local Hugging Face folder, or a hub id.

    Raises:
        ModelLoadError: for a missing path, an unreachable hub, or a folder that is not a model.
    """
    source = (source or "").strip()
    if not source:
        raise ModelLoadError("no model given: use 'embedded', a local folder or a hub id")
    if source == EMBEDDED:
        folder = embedded_dir()
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"the embedded model is missing from {folder}; "
                                 f"recreate it with: python -m mopeq train-tiny --out {folder}")
        return _load_dir(folder, EMBEDDED, trust_remote_code, dtype)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
        return _load_dir(path, str(path), trust_remote_code, dtype)
    if _looks_local(source):
        raise ModelLoadError(f"no such model folder: {source}")
    local, sha = _download(source, revision)
    loaded = _load_dir(local, source, trust_remote_code, dtype)
    loaded.fingerprint = _sha256(f"hub:{source}@{sha}".encode())
    return loaded


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or os.sep + os.sep in source


def _download(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """Fetch a hub snapshot (config, weights, processor files) or fail fast offline."""
    try:
        from huggingface_hub import HfApi, snapshot_download

        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise OSError("HF_HUB_OFFLINE=1")
        info = HfApi().model_info(repo_id, revision=revision, timeout=10)
        path = snapshot_download(repo_id, revision=info.sha,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                 "*.py", "*.tiktoken"])
        return Path(path), str(info.sha)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not reachable"
        raise ModelLoadError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc)[:160]}). If this machine is offline, download the model elsewhere and "
            f"pass its local folder instead."
        ) from None


@contextlib.contextmanager
def conversion_mappings_kept():
    """Undo what a load does to transformers' process-wide checkpoint conversion registry.

    Loading an auto-round checkpoint on transformers 5 runs auto-round's
    ``disable_moe_conversion_mapping``: it re-registers the model type's conversions (e.g.
    ``olmoe``) without their ``WeightConverter``s, the rules that fuse per-expert
    ``gate_proj``/``up_proj``/``down_proj`` weights into ``experts.gate_up_proj`` and
    ``experts.down_proj``. That registry is global, so every later 16-bit load of the same model
    type in the process found its fused expert weights "missing" and left them freshly
    initialised. On exit, entries that existed before are put back as they were (entries added
    meanwhile stay, e.g. by a model's own code); on a transformers without this registry it does
    nothing.
    """
    try:
        from transformers import conversion_mapping as cm

        cm.get_checkpoint_conversion_mapping("")  # builds the lazily created registry
        registry: dict = cm._checkpoint_conversion_mapping_cache
        user: set = cm.USER_REGISTERED_MAPPINGS
    except (ImportError, AttributeError):
        yield
        return
    saved = {k: copy.copy(v) for k, v in registry.items()}
    saved_user = set(user)
    try:
        yield
    finally:
        for key, value in saved.items():
            if registry.get(key) != value:
                registry[key] = value
                if key not in saved_user:
                    user.discard(key)


# one load at a time: the conversion registry a load may rewrite is process-wide, so a second
# load in another thread (two users of the app) must not run while the first has it rewritten
_LOADING = threading.RLock()


def _load_dir(path: Path, source: str, trust_remote_code: bool, dtype) -> LoadedModel:
    with _LOADING, conversion_mappings_kept():
        return _load_dir_unguarded(path, source, trust_remote_code, dtype)


def _load_dir_unguarded(path: Path, source: str, trust_remote_code: bool, dtype) -> LoadedModel:
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type", "")
    from mopeq.embedded import tiny

    if model_type == tiny.MODEL_TYPE:
        model, processor = tiny.load(path, dtype=dtype)
        mark_stored_dtypes(model, path)
        return LoadedModel(model, processor, fingerprint_dir(path), source, "tiny_vlm", path)
    native = native_arch(config)
    if native is not None:
        model, processor = native.load(path, dtype)
        mark_stored_dtypes(model, path)  # key-mapped names fall back to the files' dtype
        return LoadedModel(model, processor, fingerprint_dir(path), source, "vlm", path)
    if "auto_map" in config and not trust_remote_code:
        raise ModelLoadError(
            f"{source} needs its own code (auto_map in config.json); pass trust_remote_code=True "
            "(--trust-remote-code) only if you trust its authors"
        )
    if "auto_map" in config:  # the user opted in to the model's own code
        try:
            model, kind = _remote_model(path, config, dtype)
        except Exception as exc:  # noqa: BLE001 - any failure of its code is reported as such
            raise ModelLoadError(remote_code_failure(config, exc)) from None
    else:
        model, kind = _auto_model(path, trust_remote_code, dtype)
    mark_stored_dtypes(model, path)
    processor = _auto_processor(path, trust_remote_code)
    return LoadedModel(model.eval(), processor, fingerprint_dir(path), source, kind, path)


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def stored_dtypes(folder: Path) -> dict | None:
    """Floating dtypes of a checkpoint as stored on disk, read from the safetensors headers.

    Returns ``{"tensors": {key: dtype}, "default": most common dtype}``, or None without
    safetensors files. A model is usually computed in fp32 here while its files hold bf16; the
    memory estimate and the export must count what the files hold, not what is in memory.
    """
    tensors: dict[str, str] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        tensors.update({k: _SAFETENSORS_DTYPES[v["dtype"]] for k, v in header.items()
                        if k != "__metadata__" and v.get("dtype") in _SAFETENSORS_DTYPES})
    if not tensors:
        return None
    values = list(tensors.values())
    return {"tensors": tensors, "default": max(set(values), key=values.count)}


def mark_stored_dtypes(model: nn.Module, folder: Path) -> None:
    """Remember the checkpoint's stored dtypes on the model (read by ``moe.discover``)."""
    from mopeq.model.moe import STORED_DTYPES_ATTR

    table = stored_dtypes(folder)
    if table is not None:
        setattr(model, STORED_DTYPES_ATTR, table)


def native_arch(config: dict):
    """The native implementation module for a ``config.json`` dict, or None."""
    module = NATIVE_ARCHS.get(config.get("model_type", ""))
    if module is None:
        return None
    import importlib

    arch = importlib.import_module(module)
    return arch if getattr(arch, "supports", lambda _c: True)(config) else None


def remote_code_failure(config: dict, exc: BaseException) -> str:
    """One line for a failure inside a model's own code: what failed and what to do."""
    import transformers

    version = ".".join(transformers.__version__.split(".")[:2])
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    hint = NATIVE_HINTS.get(config.get("model_type", ""))
    if hint is None:
        written = config.get("transformers_version")
        hint = (f"pin the transformers version its code was written for ({written})" if written
                else "pin the transformers version its code was written for")
    return (f"the model's own code failed on transformers {version}: {type(exc).__name__}: "
            f"{first}; {hint}")


def _auto_model(path: Path, trust_remote_code: bool, dtype) -> tuple[nn.Module, str]:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    errors = []
    for cls, kind in ((AutoModelForCausalLM, "causal_lm"), (AutoModelForImageTextToText, "vlm")):
        try:
            return cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                       device_map="cpu"), kind
        except (ValueError, KeyError, OSError) as exc:
            errors.append(f"{cls.__name__}: {str(exc)[:200]}")
    raise ModelLoadError(f"could not load {path} as a causal LM or a VLM: " + " | ".join(errors))


def _remote_model(path: Path, config: dict, dtype) -> tuple[nn.Module, str]:
    """The class its ``auto_map`` names (a causal LM, else a VLM), with its own code."""
    import transformers

    auto_map = config["auto_map"]
    for name, kind in (("AutoModelForCausalLM", "causal_lm"),
                       ("AutoModelForImageTextToText", "vlm"), ("AutoModel", "causal_lm")):
        if name in auto_map:
            cls = getattr(transformers, name)
            return cls.from_pretrained(path, dtype=dtype, trust_remote_code=True,
                                       device_map="cpu"), kind
    raise ModelLoadError(f"{path}: auto_map names no model class ({sorted(auto_map)})")


def is_remote_code_error(exc: BaseException) -> bool:
    """Whether an exception was raised inside code a model brought (the hub modules cache)."""
    import traceback

    return any("transformers_modules" in frame.filename
               for frame in traceback.extract_tb(exc.__traceback__))


def _auto_processor(path: Path, trust_remote_code: bool):
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return _with_vocabulary(AutoProcessor.from_pretrained(
            path, trust_remote_code=trust_remote_code))
    except Exception:  # noqa: BLE001 - e.g. a video processor that needs torchvision
        pass
    image_only = image_processor_only(path)
    if image_only is not None:
        return image_only
    try:
        return _with_vocabulary(AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code))
    except Exception:  # noqa: BLE001 - a model without a processor is still usable
        return None


def _with_vocabulary(processor):
    """``processor``, or None for an empty tokenizer.

    transformers 5 builds one for a folder without tokenizer files; it encodes every text to
    no ids at all, which would leave calibration without data.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    if callable(tokenizer) and hasattr(tokenizer, "get_vocab"):
        if not tokenizer("a b c", add_special_tokens=False)["input_ids"]:
            return None
    return processor


def image_processor_only(path: Path):
    """The model's processor from its image processor and tokenizer, without the video part.

    transformers' MoE VLM processors (Qwen3-VL-MoE, GLM-4V-MoE, ...) build a video processor
    that needs torchvision; MME-style questions need only images. None when the folder has no
    image processor or the model type has no known processor class.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    nested = path / "processor_config.json"  # transformers 5 nests sub-processors here
    if not (path / "preprocessor_config.json").exists() and not (
            nested.exists() and "image_processor" in json.loads(nested.read_text())):
        return None
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        return None
    try:
        image_processor = AutoImageProcessor.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - no usable image processor or tokenizer here
        return None

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin takes its sub-processors from this signature: no video processor
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    image_only = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    template = getattr(tokenizer, "chat_template", None)
    return image_only(image_processor, tokenizer, chat_template=template)


# ----------------------------------------------------------------------- fingerprints


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint_dir(path: str | Path, full_hash_limit: int = 512 * 2**20) -> str:
    """sha256 of config.json and the weight files (sampled beyond ``full_hash_limit`` bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    h.update(json.dumps(json.loads((path / "config.json").read_text()), sort_keys=True).encode())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            if size <= full_hash_limit:
                for chunk in iter(lambda: fh.read(2**20), b""):
                    h.update(chunk)
            else:  # large checkpoints: head, tail and the safetensors header
                h.update(fh.read(2**20))
                fh.seek(-(2**20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()


def fingerprint_model(model: nn.Module) -> str:
    """sha256 of a model's config and parameters (for models built in memory)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        t = p.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()
