"""utils.notices: noise known on CPU hosts filtered precisely; Hugging Face's bars off when stderr is a log."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

from helpers.paths import ROOT
from megatron_vpmoe.utils import notices

CUDA_ADVICE = ("When using async grad allreduce it is recommended to set the environment variable "
               "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup")


def test_cuda_connection_advice_is_filtered_only_when_asked_for_cpu(monkeypatch):
    monkeypatch.delenv(notices.VERBOSE_ENV, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn(CUDA_ADVICE, UserWarning)
        notices.filter_cpu_warnings()
        warnings.warn(CUDA_ADVICE, UserWarning)
        warnings.warn("another UserWarning", UserWarning)
    assert [str(w.message) for w in seen] == [CUDA_ADVICE, "another UserWarning"]


def test_blend_of_one_note_is_dropped_and_other_records_kept():
    probe = ("import logging, sys; from megatron_vpmoe.utils.notices import install; install()\n"
             "log = logging.getLogger('megatron.core.datasets.blended_dataset')\n"
             "log.warning('Building a BlendedDataset for a single MegatronDataset'); log.warning('kept')\n"
             "import os; print(os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))")
    env = {k: v for k, v in os.environ.items() if k not in (notices.VERBOSE_ENV, notices.HF_BARS_ENV)}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "kept" and out.stdout.strip() == "1"  # stderr is a pipe: no HF bars
