"""Sharded, atomic, verified checkpoints with torch.distributed.checkpoint (DCP); each rank writes only its own shards.

On-disk layout (``checkpoint.dir``, default ``{run.dir}/checkpoints``)::

    latest                          text: the name of the newest complete checkpoint ("step_00000020")
    step_00000010/                  one complete checkpoint
        .metadata                   DCP metadata: every key, its global shape/dtype, where its chunks live
        __<rank>_0.distcp           the chunks rank <rank> wrote (its own shards, global offsets)
        trainer_state.json          step, consumed samples, layout and world size it was saved at, format
        config.yaml                 the resolved run config
        rng/rank_00000.safetensors  torch(/cuda) RNG state as tensors, python/numpy state as JSON metadata
        manifest.json               size and sha256 of every file above, digest of the model config (written last)
    .tmp-step_00000030/             a save in progress (or killed): never read, removed by the next save

DCP keys are ``model.<fqn>`` (parameter and buffer names of the single-process model) and
``optim.state.<fqn>.{exp_avg,exp_avg_sq,step}`` / ``optim.param_groups.<fqn>.<hyper>`` (the
optimizer flattened per parameter, as torch's ``flatten_optimizer_state_dict``). A TP- or
EP-sharded tensor (and optimizer state of its shape) is handed to DCP as a DTensor over the
group it is split on (:meth:`ParallelModel.as_sharded`), so every rank writes only its own
shard with its global offset, nothing is gathered; tensors replicated over data-parallel
ranks are written once (DCP's planner deduplicates identical chunks across ranks); with
ZeRO (the distributed optimizer) each rank holds, writes and loads only the optimizer state it owns (its rows of a
row-split parameter, as a DTensor sharded by rows over the DP group; whole parameters it owns). Loading builds the
same DTensor templates for the *current* layout and DCP reads the overlapping parts of the
saved chunks, so a checkpoint loads under any TP/EP/PP/DP layout, on one CPU process without
a process group (:func:`load_model_state_dict`, used by the converters), and format-2
checkpoints (full tensors, ``rank_*.pt`` RNG files) still load.

A save writes into ``.tmp-<name>``; each rank hashes what it wrote, rank 0 writes
``manifest.json``, renames the directory to ``<name>`` when every rank has finished and then
rewrites ``latest`` atomically, so a crash at any point (even ``kill -9``) leaves the previous
checkpoint and pointer intact. ``keep_last`` newest checkpoints are kept. With ``async_save``
the state is copied into CPU buffers allocated once and reused (pinned with CUDA), DCP writes
them in a background thread, and the manifest and rename happen at the next save or at the end
of the run (:meth:`CheckpointManager.finalize`).

Loading verifies the manifest first (:mod:`~megatron_vpmoe.training.checkpoint_manifest`);
``checkpoint.load: auto`` falls back to the newest intact checkpoint with a warning naming the
damaged one. Nothing is unpickled with the full pickle machinery
(:mod:`~megatron_vpmoe.training.checkpoint_files`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager

from megatron_vpmoe.parallel.model import ParallelModel
from megatron_vpmoe.parallel.zero import DistributedOptimizer, inner_optimizer
from megatron_vpmoe.training.checkpoint_files import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    capture_rng,  # noqa: F401 - public here: the state a resume restores (restore_rng below)
    legacy_rng_file,
    load_rng,
    read_metadata,
    restore_rng,
    rng_file,
    save_rng,
)
from megatron_vpmoe.training.checkpoint_manifest import (
    MANIFEST,
    DamagedCheckpointError,
    hash_files,
    model_config_differences,
    verify_checkpoint,
    write_manifest,
)
from megatron_vpmoe.training.distributed import barrier, world
from megatron_vpmoe.utils.atomic import atomic_write_text
from megatron_vpmoe.utils.errors import InputError, VpmoeError
from megatron_vpmoe.utils.notices import filter_known_warnings, quiet

FORMAT_VERSION = 3  # 3: sharded writes, manifest.json, RNG without pickle
READABLE_FORMATS = (2, 3)  # 2: full tensors, rank_*.pt RNG files, no manifest
LATEST = "latest"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _warn(text: str) -> None:
    if world()[0] == 0:
        print(f"vpmoe: warning: {text}", file=sys.stderr, flush=True)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The checkpoint ``root/latest`` names; None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(f"{pointer}: not a checkpoint pointer (binary content)") from None
    target = Path(root) / name
    if not _NAME.match(name) or not (target / ".metadata").is_file():
        raise InputError(f"{pointer}: points to {name!r}, which is not a complete checkpoint")
    return target


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a checkpoint root (then its ``latest``)."""
    p = Path(path)
    if (p / ".metadata").is_file():
        return p
    if (p / LATEST).is_file():
        return latest_checkpoint(p)
    raise InputError(f"{p}: not a checkpoint (no .metadata) and no '{LATEST}' pointer in it")


def read_trainer_state(ckpt: str | os.PathLike) -> Dict[str, Any]:
    path = Path(ckpt) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing; not a vpmoe training checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise InputError(f"{path}{where}: not valid JSON: {getattr(err, 'msg', err)}") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format") if isinstance(state, dict) else None
        raise InputError(f"{path}: checkpoint format {found!r}, expected one of {READABLE_FORMATS}")
    return state


def check_integrity(ckpt: str | os.PathLike, *, distributed: bool = True) -> None:
    """Raise :class:`DamagedCheckpointError` unless every file matches ``manifest.json``
    (format-2 checkpoints have none and are not checked). ``distributed``: with a process
    group, the ranks share the hashing and all raise the same error (a collective)."""
    ckpt = Path(ckpt)
    if not (ckpt / MANIFEST).is_file():
        try:
            fmt = read_trainer_state(ckpt)["format"]
        except InputError as err:
            raise DamagedCheckpointError(str(err)) from None
        if fmt >= 3:
            raise DamagedCheckpointError(f"{ckpt / MANIFEST}: missing; the checkpoint cannot be verified")
        return
    verify_checkpoint(ckpt, distributed=distributed)


def latest_intact_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest checkpoint under ``root`` that passes :func:`check_integrity` (the one
    ``latest`` names first); a damaged one is skipped with a warning naming it. None when
    there is no checkpoint; an error when every one is damaged."""
    root = Path(root)
    candidates = list(reversed(list_checkpoints(root)))
    pointer = root / LATEST
    if pointer.is_file():
        try:
            named = root / pointer.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError:
            named = None
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        else:
            _warn(f"{pointer} does not name a checkpoint; using the newest intact one")
    for ckpt in candidates:
        try:
            check_integrity(ckpt)
            return ckpt
        except DamagedCheckpointError as err:
            _warn(f"checkpoint {ckpt} is damaged ({err}); falling back to an older one")
    if candidates:
        raise InputError(f"{root}: every checkpoint is damaged ({', '.join(c.name for c in candidates)})")
    return None


def check_model_config(ckpt: str | os.PathLike, model_section: Dict[str, Any]) -> None:
    """Refuse to load ``ckpt`` into a model whose config differs from the one it was saved
    with in anything but the training-only keys (one line naming the keys)."""
    import yaml

    path = Path(ckpt) / CONFIG_FILE
    if not path.is_file():  # saved without a config (a plain CheckpointManager.save): shapes are checked on load
        return
    try:
        saved = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    diff = model_config_differences(saved, model_section)
    if diff:
        raise InputError(f"{path}: the checkpoint's model differs from this run's in {', '.join(diff)}; "
                         f"a checkpoint loads only into the model it was saved from")


def _dcp_load(state: Dict[str, Any], ckpt: Path, no_dist: bool) -> None:
    """``dcp.load`` with the safe reader and planner; a user-facing error raised inside DCP on
    any rank comes out as itself instead of DCP's multi-line CheckpointException."""
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)), planner=SafeLoadPlanner(ckpt),
                     no_dist=no_dist)
    except CheckpointException as err:
        for exc, _ in err.failures.values():
            if isinstance(exc, VpmoeError):
                raise exc from None
        raise


def _check_against_metadata(metadata, state: Dict[str, Dict[str, Any]], ckpt: Path) -> None:
    """Every key the template asks for is in the checkpoint, with the same global shape."""
    saved = metadata.state_dict_metadata
    for section, values in state.items():
        for key, value in values.items():
            meta = saved.get(f"{section}.{key}")
            if meta is None:
                what = "optimizer state" if section == "optim" else "model tensor"
                raise InputError(f"{ckpt}: has no {what} {section}.{key} (saved from another model, "
                                 f"or without optimizer state: load it with checkpoint.load_optimizer=false)")
            if (isinstance(value, torch.Tensor) and isinstance(meta, TensorStorageMetadata)
                    and tuple(meta.size) != tuple(value.shape)):
                raise InputError(f"{ckpt}: {section}.{key} has shape {tuple(meta.size)}, this model's is "
                                 f"{tuple(value.shape)}")


def load_model_state_dict(ckpt: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU, without a process group or the same world size."""
    ckpt = resolve_checkpoint(ckpt)
    check_integrity(ckpt, distributed=False)
    metadata = read_metadata(ckpt)
    template = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            template[key[len("model."):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not template:
        raise InputError(f"{ckpt}: holds no model tensors")
    return load_tensors(ckpt, template)


def load_tensors(ckpt: Path, template: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Fill ``template`` (``{model key: tensor of its global shape}``) from ``ckpt`` in this
    process alone (no process group; the caller verified the checkpoint)."""
    state = {"model": template}
    _dcp_load(state, Path(ckpt), no_dist=True)
    return state["model"]


def _no_dist() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def _quiet_single_process():
    """DCP warns that it assumes a single process when there is no process group; that is intended
    (one of ``utils/notices.py``'s known notices)."""
    return quiet()


# ---- the state: single-process keys, this rank's shards as DTensors with global shapes ---------
ShardFn = Callable[[str, torch.Tensor], torch.Tensor]


def _layout(model) -> tuple:
    """``(module, as_sharded)``: a parallel-engine model (``ParallelModel``) wraps its TP/EP
    shards as DTensors; a plain module's tensors (DTensors already, or whole) stay as they are."""
    if isinstance(model, ParallelModel):
        return model.module, model.as_sharded
    return model, lambda key, tensor: tensor


def _param_of(optimizer) -> Callable[[torch.Tensor], torch.Tensor]:
    """The whole parameter of a tensor the optimizer steps (ZeRO: a view of its rows; else itself)."""
    return optimizer.param_of if isinstance(optimizer, DistributedOptimizer) else (lambda t: t)


def _fqn_of(module, optimizer):
    """The single-process name of a tensor in the torch optimizer's groups: its parameter's, also
    for the view of a parameter's rows a ZeRO rank steps."""
    names = {p: name for name, p in module.named_parameters()}
    param_of = _param_of(optimizer)
    return lambda t: names[param_of(t)]


def _kept_tensors(module, optimizer) -> List[torch.Tensor]:
    """The optimizer's tensors whose state this rank holds (ZeRO: its rows and owned parameters)."""
    owns = optimizer.owns if isinstance(optimizer, DistributedOptimizer) else None
    param_of = _param_of(optimizer)
    return [t for group in inner_optimizer(optimizer).param_groups for t in group["params"]
            if owns is None or owns(param_of(t))]


def _model_state(module, as_sharded: ShardFn) -> Dict[str, torch.Tensor]:
    return {key: as_sharded(key, value) for key, value in module.state_dict().items()
            if not key.endswith("_extra_state")}


def _optimizer_state(module, optimizer, as_sharded: ShardFn) -> Dict[str, Any]:
    """``state.<fqn>.<name>`` for the state this rank holds (its own tensors, shards wrapped)
    and ``param_groups.<fqn>.<hyper>`` for every parameter: torch's flattened layout."""
    opt = inner_optimizer(optimizer)
    wrap = optimizer.state_as_sharded if isinstance(optimizer, DistributedOptimizer) else None
    fqn_of = _fqn_of(module, optimizer)
    out: Dict[str, Any] = {}
    for group in opt.param_groups:
        for t in group["params"]:
            fqn = fqn_of(t)
            for hyper, value in group.items():
                if hyper != "params":
                    out[f"param_groups.{fqn}.{hyper}"] = value
            for name, value in opt.state.get(t, {}).items():
                if not isinstance(value, torch.Tensor):
                    out[f"state.{fqn}.{name}"] = value
                elif wrap is not None:
                    out[f"state.{fqn}.{name}"] = wrap(fqn, t, value, as_sharded)
                else:
                    out[f"state.{fqn}.{name}"] = as_sharded(fqn, value)
    return out


@torch.no_grad()
def _init_missing_state(module, optimizer) -> None:
    """Create the optimizer state of the kept tensors that have none yet (one step with zero
    gradients at learning rate 0, as torch's ``set_optimizer_state_dict`` does), so a load has
    tensors of the right shape to read into. Other tensors get none (ZeRO)."""
    opt = inner_optimizer(optimizer)
    missing = {t for t in _kept_tensors(module, optimizer) if not opt.state.get(t)}
    if not missing:
        return
    grads = {t: t.grad for group in opt.param_groups for t in group["params"]}
    lrs = [group["lr"] for group in opt.param_groups]
    try:
        for t in grads:
            t.grad = torch.zeros_like(t) if t in missing else None
        for group in opt.param_groups:
            group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
        opt.step()
    finally:
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        for t, grad in grads.items():
            t.grad = grad


def _state(model, optimizer, *, with_optimizer: bool = True) -> Dict[str, Any]:
    """The state to save, or the template to load into (in place: the tensors are the model's
    and the optimizer's own), at single-process keys and global shapes."""
    module, as_sharded = _layout(model)
    state = {"model": _model_state(module, as_sharded)}
    if with_optimizer and optimizer:
        state["optim"] = _optimizer_state(module, optimizer, as_sharded)
    return state


def _apply_optimizer_values(module, optimizer, loaded: Dict[str, Any]) -> None:
    """After an in-place load: the non-tensor values (hyperparameters per group, from its first
    parameter; non-tensor state entries)."""
    opt = inner_optimizer(optimizer)
    fqn_of = _fqn_of(module, optimizer)
    for group in opt.param_groups:
        first = fqn_of(group["params"][0])
        for hyper in group:
            if hyper != "params":
                group[hyper] = loaded[f"param_groups.{first}.{hyper}"]
        for t in group["params"]:
            for name, value in opt.state.get(t, {}).items():
                if not isinstance(value, torch.Tensor):
                    opt.state[t][name] = loaded[f"state.{fqn_of(t)}.{name}"]


class CpuBufferStager(AsyncStager):
    """Stages a state for ``dcp.async_save`` into CPU buffers allocated on the first save and
    reused by the later ones (``copy_`` only; pinned when CUDA is available). DCP writes the
    staged buffers as they are (no second copy). A buffer is reused only after the previous
    save that wrote it has finished (:meth:`CheckpointManager.save` finalizes first)."""

    _synchronize_after_execute = False

    def __init__(self):
        self._buffers: Dict[str, torch.Tensor] = {}

    def stage(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        staged = {section: {key: self._stage(f"{section}.{key}", value) for key, value in values.items()}
                  for section, values in state_dict.items()}
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return staged

    def _stage(self, key: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return copy.deepcopy(value)  # hyperparameters: small, and the trainer changes them
        from torch.distributed.tensor import DTensor

        local = value.to_local() if isinstance(value, DTensor) else value
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
            buffer = torch.empty(local.shape, dtype=local.dtype, pin_memory=torch.cuda.is_available())
            self._buffers[key] = buffer
        buffer.copy_(local.detach(), non_blocking=True)
        if isinstance(value, DTensor):
            return DTensor.from_local(buffer, value.device_mesh, value.placements, run_check=False,
                                      shape=value.shape, stride=value.stride())
        return buffer

    def staged_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def close(self) -> None:
        self._buffers.clear()


def _own_files(ckpt: Path, rank: int, save_rank: int) -> Dict[str, Dict[str, Any]]:
    """Size and sha256 of the files this rank wrote into ``ckpt`` (rank 0: the shared ones too)."""
    names = [p.name for p in ckpt.glob(f"__{save_rank}_*.distcp")]
    names.append(str(rng_file(ckpt, rank).relative_to(ckpt)))
    if rank == 0:
        names += [".metadata", STATE_FILE, CONFIG_FILE]
    return hash_files(ckpt, names)


def _gather_to_rank0(obj: Any) -> Optional[List[Any]]:
    import torch.distributed as dist

    if _no_dist():
        return [obj]
    rank = dist.get_rank()
    out = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


class CheckpointManager:
    """Saves and loads a run's checkpoints under ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike, *, keep_last: int = 3, async_save: bool = False,
                 before_publish: Optional[Callable[[int, Path], None]] = None):
        self.root = Path(root)
        # called with (step, temp dir) once a synchronous save's files are all written, just before
        # the rename publishes them (a test pauses there to kill the process mid-save)
        self.before_publish = before_publish
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending = None  # (future of this rank's file entries, tmp dir, final dir, name, model section)
        self._async_group = None
        self._stager: Optional[CpuBufferStager] = None
        self._hasher: Optional[ThreadPoolExecutor] = None
        if async_save and not _no_dist():
            # the background writer's collectives get their own group, so they never interleave
            # with the training loop's collectives on the default group
            import torch.distributed as dist

            self._async_group = dist.new_group(backend="gloo")

    # ---- save -------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, trainer_state: Dict[str, Any], *,
             config_text: Optional[str] = None) -> Path:
        self.finalize()
        rank, world_size = world()
        name = checkpoint_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            (tmp / "rng").mkdir()
            state = dict(trainer_state, format=FORMAT_VERSION, step=step, saved_at=time.time())
            state.setdefault("world_size", world_size)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            if config_text is not None:
                (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        barrier()
        save_rng(rng_file(tmp, rank))
        model_section = _model_section(config_text)
        if isinstance(optimizer, DistributedOptimizer):  # ZeRO: the weights' last all-gather landed
            optimizer.wait_for_parameters()
        state = _state(model, optimizer)
        if self.async_save:
            if self._stager is None:
                self._stager = CpuBufferStager()
                # DCP's background thread warns about a single process where _quiet_single_process
                # cannot reach it; a single process is intended
                filter_known_warnings()
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="vpmoe-ckpt-hash")
            with _quiet_single_process():
                written = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(str(tmp)),
                                         async_stager=self._stager, no_dist=_no_dist(),
                                         process_group=self._async_group)
            save_rank = rank  # the async group spans every rank in order
            entries = self._hasher.submit(_hash_when_written, written, tmp, rank, save_rank)
            self._pending = (entries, tmp, final, name, model_section)
            return final
        with _quiet_single_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=_no_dist())
        self._complete(_own_files(tmp, rank, rank), tmp, model_section)
        if self.before_publish is not None:
            self.before_publish(step, tmp)
        self._publish(tmp, final, name)
        return final

    def _complete(self, entries: Dict[str, Dict[str, Any]], tmp: Path, model_section) -> None:
        """Rank 0 writes the manifest from every rank's entries (the last file of a checkpoint)."""
        gathered = _gather_to_rank0(entries)
        if gathered is not None:
            files: Dict[str, Dict[str, Any]] = {}
            for part in gathered:
                files.update(part)
            write_manifest(tmp, files, model_section)

    def finalize(self) -> None:
        """Wait for a pending async save, write its manifest and publish it."""
        if self._pending is None:
            return
        entries, tmp, final, name, model_section = self._pending
        self._pending = None
        self._complete(entries.result(), tmp, model_section)
        self._publish(tmp, final, name)

    def close(self) -> None:
        """Finalize and release the async buffers and threads."""
        self.finalize()
        if self._stager is not None:
            self._stager.close()
            self._hasher.shutdown()
            self._stager = self._hasher = None

    def _publish(self, tmp: Path, final: Path, name: str) -> None:
        barrier()  # every rank's shards are on disk
        rank, _ = world()
        if rank == 0:
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, name + "\n")
            self._prune(keep=final)
        barrier()

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        ckpts = list_checkpoints(self.root)
        for old in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # ---- load -------------------------------------------------------------------------
    def load(self, ckpt: str | os.PathLike, model, optimizer, *, load_optimizer: bool = True,
             restore_rng_state: bool = True, model_config: Optional[Dict[str, Any]] = None,
             verify: bool = True) -> Dict[str, Any]:
        """Load ``ckpt`` into ``model`` (and ``optimizer``) in place; returns its trainer state.

        ``verify``: check the manifest first (skip only for a checkpoint just verified);
        ``model_config``: this run's ``model`` section, compared with the saved ``config.yaml``."""
        ckpt = resolve_checkpoint(ckpt)
        if verify:
            check_integrity(ckpt)
        trainer_state = read_trainer_state(ckpt)
        if model_config is not None:
            check_model_config(ckpt, model_config)
        module, _ = _layout(model)
        if isinstance(optimizer, DistributedOptimizer):  # nothing may land on the loaded weights later
            optimizer.wait_for_parameters()
        if load_optimizer and optimizer:
            _init_missing_state(module, optimizer)
        state = _state(model, optimizer, with_optimizer=load_optimizer)
        _check_against_metadata(read_metadata(ckpt), state, ckpt)
        _dcp_load(state, ckpt, no_dist=_no_dist())
        if "optim" in state:
            _apply_optimizer_values(module, optimizer, state["optim"])
        if restore_rng_state:
            restore_rng(load_rng(self._rng_file(ckpt, trainer_state)))
        trainer_state["path"] = str(ckpt)
        return trainer_state

    @staticmethod
    def _rng_file(ckpt: Path, trainer_state: Dict[str, Any]) -> Path:
        """This rank's RNG file; a rank beyond the saved world size reuses rank 0's streams (with
        a warning); a missing file of a rank that saved one is an error."""
        rank, world_size = world()
        find = legacy_rng_file if trainer_state["format"] == 2 else rng_file
        saved_world = trainer_state.get("world_size")
        if saved_world is not None and world_size > int(saved_world):
            _warn(f"{ckpt} was saved by {saved_world} processes; ranks {saved_world} and up reuse "
                  f"rank 0's RNG streams")
            if rank >= int(saved_world):
                rank = 0
        path = find(ckpt, rank)
        if not path.is_file():
            raise InputError(f"{path}: missing; cannot restore this rank's RNG state "
                             f"(load with checkpoint.load_optimizer=false to start fresh from the weights)")
        return path


def _hash_when_written(written: Future, tmp: Path, rank: int, save_rank: int) -> Dict[str, Dict[str, Any]]:
    written.result()  # re-raises the background save's error
    return _own_files(tmp, rank, save_rank)


def _model_section(config_text: Optional[str]) -> Optional[Dict[str, Any]]:
    if config_text is None:
        return None
    import yaml

    return (yaml.safe_load(config_text) or {}).get("model")
