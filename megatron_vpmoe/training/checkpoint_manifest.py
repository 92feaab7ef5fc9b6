"""Checkpoint integrity: ``manifest.json`` (every file's size and sha256, the model config's digest) and its verification.

A save ends with each rank hashing the files it wrote (its ``__<rank>_*.distcp`` shards and
RNG file; rank 0 also ``.metadata``, ``trainer_state.json``, ``config.yaml``); rank 0 gathers
the entries and writes ``manifest.json`` last, before the checkpoint directory is renamed
into place. :func:`verify_checkpoint` recomputes them (split over the ranks when there is a
process group) and raises :class:`DamagedCheckpointError` naming the first file that is
missing, has another size or another hash. :func:`model_config_differences` compares the
``model`` section saved in ``config.yaml`` with the current one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from megatron_vpmoe.utils.atomic import atomic_write_text
from megatron_vpmoe.utils.errors import InputError

MANIFEST = "manifest.json"
# model keys that change how the weights are trained, not what they compute or their shapes
TRAINING_ONLY_MODEL_KEYS = frozenset({"init_method_std", "hidden_dropout", "attention_dropout",
                                      "moe_router_bias_update_rate", "moe_aux_loss_coeff"})


class DamagedCheckpointError(InputError):
    """A checkpoint whose files do not match its manifest (or that has none)."""


def file_entry(path: Path) -> Dict[str, Any]:
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


def hash_files(ckpt: Path, names: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """``{relative name: {size, sha256}}`` of the files ``names`` under ``ckpt`` that exist."""
    out = {}
    for name in names:
        path = Path(ckpt) / name
        if path.is_file():
            out[name] = file_entry(path)
    return out


def config_digest(model_section: Optional[Dict[str, Any]]) -> Optional[str]:
    if model_section is None:
        return None
    return hashlib.sha256(json.dumps(model_section, sort_keys=True).encode()).hexdigest()


def write_manifest(ckpt: Path, files: Dict[str, Dict[str, Any]], model_section: Optional[Dict[str, Any]]) -> None:
    manifest = {"hash": "sha256", "model_config_sha256": config_digest(model_section),
                "files": dict(sorted(files.items()))}
    atomic_write_text(Path(ckpt) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def read_manifest(ckpt: Path) -> Dict[str, Any]:
    path = Path(ckpt) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                for e in files.values()):
            raise ValueError("'files' must map names to {size, sha256}")
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{path}: missing; the checkpoint cannot be verified") from None
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedCheckpointError(f"{path}: not a valid manifest ({err})") from None
    return manifest


def _check(ckpt: Path, names: List[str], files: Dict[str, Dict[str, Any]]) -> Optional[str]:
    for name in names:
        path = Path(ckpt) / name
        want = files[name]
        if not path.is_file():
            return f"{path}: missing (listed in {MANIFEST})"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path}: {size} bytes, the manifest says {want['size']} (truncated or replaced)"
        if file_entry(path)["sha256"] != want["sha256"]:
            return f"{path}: sha256 differs from the manifest (damaged)"
    return None


def verify_checkpoint(ckpt: Path, *, distributed: bool = True) -> None:
    """Check every file the manifest lists (size and sha256). ``distributed`` with a process
    group: each rank hashes a share and all ranks raise the same :class:`DamagedCheckpointError`
    (a collective); otherwise this process checks every file."""
    import torch.distributed as dist

    manifest = read_manifest(ckpt)
    names = sorted(manifest["files"])
    distributed = distributed and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    problem = _check(ckpt, names[rank::world], manifest["files"])
    if distributed:
        found: List[Optional[str]] = [None] * world
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p), None)
    if problem:
        raise DamagedCheckpointError(problem)


def model_config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``model.<key> (saved -> current)`` for every key both sections have, other than the
    training-only ones, that differs (a key a config of an older version lacks is not compared)."""
    out = []
    for key in sorted(set(saved) & set(current)):
        if key in TRAINING_ONLY_MODEL_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            same = float(a) == float(b)
        else:
            same = a == b
        if not same:
            out.append(f"model.{key} ({a!r} -> {b!r})")
    return out
