"""Reading and writing checkpoint files without running code from them (DCP metadata, non-tensor values, RNG state).

A checkpoint is data someone may hand you, so nothing in it is unpickled with the full
pickle machinery:

* DCP's ``.metadata`` is a pickle (torch 2.13's ``FileSystemReader.read_metadata`` calls
  ``pickle.load``). :class:`SafeFileSystemReader` reads it with an unpickler that resolves
  only the classes DCP metadata is made of (an allow-list); anything else is an
  :class:`~megatron_vpmoe.utils.errors.InputError` naming the file and the refused global.
* Non-tensor values in ``.distcp`` files (the optimizer's hyperparameters) are read by
  DCP's default planner with ``torch.load(weights_only=False)``; :class:`SafeLoadPlanner`
  reads them with ``weights_only=True`` (plain Python values only). Tensors are already read
  with ``weights_only=True`` by DCP.
* RNG state is a safetensors file per rank (``rng/rank_<rank>.safetensors``): the torch/CUDA
  generator states as uint8 tensors, the Python and NumPy Mersenne-Twister states as JSON in
  the file's string metadata. Checkpoints of format 2 (``rank_<rank>.pt``) are read with
  ``torch.load(weights_only=True)`` and NumPy's array reconstruction allow-listed.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_vpmoe.utils.errors import InputError

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name ("torch.strided")
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP metadata's classes and torch dtypes; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` admits only DCP metadata's classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except FileNotFoundError:
            raise InputError(f"{path}: missing; not a complete checkpoint") from None
        except Exception as err:  # noqa: BLE001 - any damage or payload is one clear error
            raise InputError(f"{path}: not valid DCP metadata, refusing to read it "
                             f"({type(err).__name__}: {err})") from None
        if not isinstance(metadata, Metadata):
            raise InputError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(ckpt: str | Path) -> Metadata:
    """The DCP metadata of checkpoint directory ``ckpt``, read with the allow-list unpickler."""
    return SafeFileSystemReader(str(ckpt)).read_metadata()


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values with ``torch.load(weights_only=True)``."""

    def __init__(self, checkpoint: str | Path):
        super().__init__()
        self._checkpoint = checkpoint

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as err:  # noqa: BLE001 - a payload or damage is one clear error
            raise InputError(f"{self._checkpoint}: value of {read_item.dest_index.fqn!r} is not plain data, "
                             f"refusing to unpickle it ({_refusal(err)})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# torch's wording of a refused global ("Unsupported global: GLOBAL m.f ..." and "Trying to load
# unsupported GLOBAL m.f whose module m is blocked") and its generic advice (re-run with
# weights_only=False, file an issue, read the docs), which must not reach the user as ours
_GLOBAL = re.compile(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)")
_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error:")


def _refusal(err: Exception) -> str:
    """The reason in one line: the global ``torch.load(weights_only=True)`` refused, else torch's
    specific complaint (an unsupported pickle opcode, damage), never its advice to load unsafely."""
    found = _GLOBAL.search(str(err))
    if found:
        return f"it references {found.group(1) or found.group(2)}, which is not allowed"
    lines = [line.strip() for line in str(err).splitlines()
             if line.strip() and not line.strip().startswith(_TORCH_ADVICE)]
    return f"{type(err).__name__}: {lines[0]}" if lines else f"{type(err).__name__}: not a plain-data torch file"


# ---- RNG state ---------------------------------------------------------------------------------
RNG_DIR = "rng"


def rng_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / RNG_DIR / f"rank_{rank:05d}.safetensors"


def legacy_rng_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / RNG_DIR / f"rank_{rank:05d}.pt"


def capture_rng() -> Dict[str, Any]:
    """This process's python/numpy/torch(/cuda) RNG state (what :func:`restore_rng` takes)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_rng(path: Path) -> None:
    """:func:`capture_rng`'s state as safetensors (generator states) + JSON metadata (python/numpy)."""
    from safetensors.torch import save_file

    state = capture_rng()
    version, mt, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"]}
    for i, cuda in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = cuda
    metadata = {"python": json.dumps([version, list(mt), gauss]),
                "numpy": json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(path), metadata=metadata)


def _load_rng(path: Path) -> Dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        version, mt, gauss = json.loads(metadata["python"])
        name, keys, pos, has_gauss, cached = json.loads(metadata["numpy"])
        state = {"python": (int(version), tuple(int(x) for x in mt), gauss),
                 "numpy": (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
                 "torch": tensors["torch"]}
    except Exception as err:  # noqa: BLE001 - damage of any kind is one clear error
        raise InputError(f"{path}: not a valid RNG state file ({type(err).__name__}: {err})") from None
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda:
        state["cuda"] = [tensors[k] for k in cuda]
    return state


def _load_legacy_rng(path: Path) -> Dict[str, Any]:
    """A format-2 ``rank_*.pt`` (torch.save of a dict) read without running code from it."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct

    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a payload or damage is one clear error
        raise InputError(f"{path}: not a plain RNG state, refusing to unpickle it ({_refusal(err)})") from None


def load_rng(path: Path) -> Dict[str, Any]:
    return _load_legacy_rng(path) if path.suffix == ".pt" else _load_rng(path)


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
