"""Sharded, atomic, resharding checkpoints with torch.distributed.checkpoint (DCP).

On-disk layout (``checkpoint.dir``, default ``{run.dir}/checkpoints``)::

    latest                      text: the name of the newest complete checkpoint ("step_00000020")
    step_00000010/              one complete checkpoint
        .metadata               DCP metadata: every key, its global shape/dtype and where its shards live
        __<rank>_0.distcp       DCP shards written by each rank
        trainer_state.json      step, consumed samples, layout it was saved at, format version
        config.yaml             the resolved run config
        rng/rank_00000.pt       python/numpy/torch(/cuda) RNG state of each rank
    .tmp-step_00000030/         a save in progress (or killed): never read, removed by the next save

DCP keys are ``model.<fqn>`` (unsharded parameter names of the plain model, buffers included)
and ``optim.state.<fqn>.{exp_avg,exp_avg_sq,step}`` / ``optim.param_groups.<fqn>.<hyper>``
(flattened per parameter). Tensors are stored with their global shapes (the parallel engine's
TP/EP shards are gathered to single-process tensors, pipeline stages write their own layers),
so a checkpoint loads under any parallel layout (TP, EP, PP, DP changed in any direction;
torch DTensor state dicts as well), and on CPU without a
process group (:func:`load_model_state_dict`, used by the Hugging Face converter).

A save writes into ``.tmp-<name>``, renames it to ``<name>`` when every rank has finished and
then rewrites ``latest`` atomically, so a crash at any point (even ``kill -9``) leaves the
previous checkpoint and pointer intact. ``keep_last`` newest checkpoints are kept. With
``async_save`` the shards are written in the background (``dcp.async_save``) from a copy of
the state, and the rename happens at the next save or at the end of the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.utils._pytree import tree_map

from megatron_vpmoe.training.distributed import barrier, world
from megatron_vpmoe.utils.atomic import atomic_write_text
from megatron_vpmoe.utils.errors import InputError

FORMAT_VERSION = 2  # 2: optimizer state flattened per parameter (layout-independent)
LATEST = "latest"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{8})$")
# Test hook: "STEP:SECONDS" pauses a synchronous save of STEP after its shards are written and
# before the rename, so a test can kill -9 the process mid-save.
PAUSE_HOOK_ENV = "VPMOE_TEST_CHECKPOINT_PAUSE"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    name = pointer.read_text(encoding="utf-8").strip()
    target = Path(root) / name
    if not (target / ".metadata").is_file():
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
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    if state.get("format") != FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return state


def load_model_state_dict(ckpt: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU, without a process group or the same world size."""
    ckpt = resolve_checkpoint(ckpt)
    metadata = dcp.FileSystemReader(str(ckpt)).read_metadata()
    template = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(meta, "size"):
            template[key[len("model."):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not template:
        raise InputError(f"{ckpt}: holds no model tensors")
    state = {"model": template}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return state["model"]


def _no_dist() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process when there is no process group; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _is_sharded(model) -> bool:
    """A parallel-engine model (``megatron_vpmoe.parallel.ParallelModel``): its shards are
    stored at single-process keys and global shapes through ``to_full``/``to_local``."""
    return hasattr(model, "to_full") and hasattr(model, "to_local")


def _param_key(optim_key: str) -> str:
    """``state.<fqn>.exp_avg`` / ``param_groups.<fqn>.lr`` -> ``<fqn>``."""
    return optim_key.split(".", 1)[1].rsplit(".", 1)[0]


def _state(model, optimizer, *, with_optimizer: bool = True) -> Dict[str, Any]:
    """The state to save (or the template to load into) at single-process keys and global shapes.

    The optimizer state is flattened per parameter (``state.<fqn>.<name>``,
    ``param_groups.<fqn>.<name>``), so it does not depend on how parameters are split
    into ranks or pipeline stages."""
    if not _is_sharded(model):
        if with_optimizer:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=_FLAT)
            return {"model": model_sd, "optim": optim_sd}
        return {"model": get_state_dict(model, [])[0]}
    state = {"model": model.full_state_dict()}
    if with_optimizer:
        # the distributed optimizer (ZeRO-1) gathers every parameter's state for the save
        full = optimizer.full_state() if hasattr(optimizer, "full_state") else contextlib.nullcontext()
        with full:
            _, optim_sd = get_state_dict(model.module, _torch_optimizer(optimizer), options=_FLAT)
            state["optim"] = {k: model.to_full(_param_key(k), v) if isinstance(v, torch.Tensor) else v
                              for k, v in optim_sd.items()}
    return state


def _torch_optimizer(optimizer):
    """The torch optimizer inside a :class:`~megatron_vpmoe.parallel.zero.DistributedOptimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


def _apply_state(model, optimizer, state: Dict[str, Any], *, with_optimizer: bool) -> None:
    if not _is_sharded(model):
        if with_optimizer:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=_FLAT)
        else:
            set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={},
                           options=StateDictOptions(strict=True))
        return
    model.load_full_state_dict(state["model"])
    if with_optimizer:
        local = {k: model.to_local(_param_key(k), v) if isinstance(v, torch.Tensor) else v
                 for k, v in state["optim"].items()}
        set_optimizer_state_dict(model.module, _torch_optimizer(optimizer), local, options=_FLAT)
        if hasattr(optimizer, "release_state"):  # ZeRO-1: keep only the parameters this rank owns
            optimizer.release_state()


class CheckpointManager:
    """Saves and loads a run's checkpoints under ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike, *, keep_last: int = 3, async_save: bool = False):
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending = None  # (future, tmp dir, final dir, name)
        self._async_group = None
        if async_save and not _no_dist():
            # the background writer's collectives get their own group, so they never interleave
            # with the training loop's collectives on the default group
            import torch.distributed as dist

            self._async_group = dist.new_group(backend="gloo")

    # ---- save -------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, trainer_state: Dict[str, Any], *,
             config_text: Optional[str] = None) -> Path:
        self.finalize()
        rank, _ = world()
        name = checkpoint_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            state = dict(trainer_state, format=FORMAT_VERSION, step=step, saved_at=time.time())
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            if config_text is not None:
                (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
        barrier()
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(capture_rng(), tmp / "rng" / f"rank_{rank:05d}.pt")
        state = _state(model, optimizer)
        if self.async_save:
            copy = tree_map(lambda t: t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t,
                            state)
            with _quiet_single_process():
                future = dcp.async_save(copy, checkpoint_id=str(tmp), no_dist=_no_dist(),
                                        process_group=self._async_group)
            self._pending = (future, tmp, final, name)
            return final
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=_no_dist())
        self._pause_hook(step, tmp)
        self._publish(tmp, final, name)
        return final

    def _pause_hook(self, step: int, tmp: Path) -> None:
        spec = os.environ.get(PAUSE_HOOK_ENV)
        if not spec:
            return
        at, seconds = spec.split(":")
        if int(at) == step:
            (tmp / "PAUSED").write_text("test hook\n")
            time.sleep(float(seconds))

    def finalize(self) -> None:
        """Wait for a pending async save and publish it."""
        if self._pending is None:
            return
        future, tmp, final, name = self._pending
        self._pending = None
        future.result()
        self._publish(tmp, final, name)

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
             restore_rng_state: bool = True) -> Dict[str, Any]:
        """Load ``ckpt`` into ``model`` (and ``optimizer``); returns its trainer state."""
        ckpt = resolve_checkpoint(ckpt)
        trainer_state = read_trainer_state(ckpt)
        state = _state(model, optimizer, with_optimizer=load_optimizer)
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(ckpt), no_dist=_no_dist())
        _apply_state(model, optimizer, state, with_optimizer=load_optimizer)
        if restore_rng_state:
            rank, _ = world()
            rng_file = ckpt / "rng" / f"rank_{rank:05d}.pt"
            if not rng_file.is_file():  # loading at a larger world size: reuse rank 0's streams
                rng_file = ckpt / "rng" / "rank_00000.pt"
            if rng_file.is_file():
                restore_rng(torch.load(rng_file, weights_only=False))
        trainer_state["path"] = str(ckpt)
        return trainer_state
