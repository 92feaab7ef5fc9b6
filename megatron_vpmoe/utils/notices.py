"""Third-party notices known to be noise on CPU hosts, and other ranks' output: silenced here, once.

Each entry says why it is silenced. :func:`install` (called by the ``vpmoe`` entry point and by
every trainer process) filters them for the whole process, turns Hugging Face's progress bars
off when stderr is not a terminal (carriage returns in a log), and on ranks other than 0 also
drops stdout and Python warnings (they repeat rank 0's), keeping stderr so errors from any rank
still show. ``--verbose`` (or ``VPMOE_VERBOSE=1``, which it exports to the ranks) shows everything.
:func:`quiet` filters the same notices inside a ``with`` block, for library code run outside the CLI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "VPMOE_VERBOSE"

# (message pattern, warning category, why it is noise here)
KNOWN_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", UserWarning,
     "megatron-core warns once per module with a TE/Apex fast path (four per process) whenever they "
     "are missing, which is always on CPU; the PyTorch fallbacks are what runs, and "
     "train.transformer_impl=transformer_engine checks TE itself when it is asked for"),
    (r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning,
     "DCP notes that it assumes one process when there is no process group: single-process saves and "
     "loads (one-rank training, convert, eval) are meant that way"),
)

# (message pattern, warning category, why it is noise on a host without CUDA): filter_cpu_warnings()
KNOWN_CPU_WARNINGS = (
    (r"environment variable CUDA_DEVICE_MAX_CONNECTIONS to 1", UserWarning,
     "megatron-core's tensor-parallel linears recommend one CUDA connection for overlapping "
     "communication with compute; there is no CUDA on a CPU host, so nothing to set"),
)

# (logger name, message pattern, why it is noise here)
KNOWN_LOG_RECORDS = (
    ("megatron.core.datasets.blended_dataset", r"Building a BlendedDataset for a single MegatronDataset",
     "data/dataset.py hands megatron-core every blend, a one-prefix one too, so that one path builds "
     "all data; megatron-core then notes the blending is unnecessary (once per split)"),
    ("megatron.core.datasets.blended_dataset", r"Cannot save the BlendedDataset indexes because path_to_cache is None",
     "one process builds the blend index in memory on purpose: megatron-core's blend cache needs "
     "torch.distributed (data/dataset.py); the per-dataset index cache is still written"),
    ("megatron.core.datasets.gpt_dataset", r"Unable to save \w*Mock\w* indexes because path_to_cache is None",
     "mock data (data.mock, smoke runs) is built in memory by one process: nothing is worth caching"),
    ("transformers.modeling_utils", r"`loss_type=None` was set in the config but it is unrecognized",
     "transformers says this for every causal-LM config without a loss_type (the converted VPMoE, the "
     "toy teacher); the default causal-LM loss it then uses is the right one"),
)

HF_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"  # read by huggingface_hub and transformers at import


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def filter_cpu_warnings() -> None:
    """Process-wide filters for :data:`KNOWN_CPU_WARNINGS` (call it once the run is known to be on
    CPU), unless verbose."""
    if verbose():
        return
    for pattern, category, _why in KNOWN_CPU_WARNINGS:
        warnings.filterwarnings("ignore", message=".*" + pattern, category=category)


def filter_known_warnings() -> None:
    """Process-wide filters for :data:`KNOWN_WARNINGS` (threads included), unless verbose."""
    if verbose():
        return
    for pattern, category, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=".*" + pattern, category=category)


class _KnownRecords(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install(*, verbose_flag: bool = False, rank: int = 0) -> None:
    """Filter the known notices for this process; on ``rank`` > 0 also drop stdout and warnings.
    ``verbose_flag`` (``--verbose``) exports ``VPMOE_VERBOSE=1`` (the ranks inherit it) and filters
    nothing. Calling it again is harmless."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        return
    if not _stderr_is_terminal():  # tqdm bars of Hugging Face (transformers' "Loading weights") in a log
        os.environ.setdefault(HF_BARS_ENV, "1")
    filter_known_warnings()
    for name, pattern, _why in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownRecords) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_KnownRecords(pattern))
    if rank > 0:
        warnings.simplefilter("ignore")
        sys.stdout.flush()
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):  # a captured stream without a descriptor
            sys.stdout = open(os.devnull, "w", encoding="utf-8")
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)  # the descriptor too: output of native code and child processes
        os.close(devnull)


@contextlib.contextmanager
def quiet():
    """The known warnings filtered inside the block (unless verbose), e.g. around an import of
    megatron-core from library code that did not go through :func:`install`."""
    with warnings.catch_warnings():
        filter_known_warnings()
        yield
