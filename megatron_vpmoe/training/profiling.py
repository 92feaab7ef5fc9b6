"""``log.profile_steps``: torch.profiler over a window of training steps, written per rank as a table and a trace."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_vpmoe.utils.atomic import atomic_file

TABLE_ROWS = 40


class StepProfiler:
    """Profiles steps ``first..last`` (1-based, as logged): call :meth:`before_step` with the step
    about to run and :meth:`after_step` with the step just finished. At the end of the window the
    rank writes ``profile/rank_N.txt`` (operators by self device time on a GPU, self CPU time
    otherwise) and ``profile/rank_N.json`` (a Chrome/Perfetto trace). Profiled steps run slower:
    their logged step times are not throughput numbers."""

    def __init__(self, window: List[int], run_dir: str, rank: int):
        self.first, self.last = (window[0], window[1]) if window else (0, -1)
        self.out = Path(run_dir) / "profile"
        self.rank = rank
        self._prof: Optional[profile] = None

    def before_step(self, step: int) -> None:
        if step == self.first and self._prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities, record_shapes=False, with_stack=False)
            self._prof.__enter__()

    def after_step(self, step: int) -> None:
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """Stops a running window early (a preemption, an error) and writes what it has."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        on_gpu = torch.cuda.is_available()
        sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=60)
        steps = self.last - self.first + 1
        with atomic_file(self.out / f"rank_{self.rank}.txt") as f:
            f.write(f"steps {self.first}..{self.last} ({steps} steps), sorted by {sort_by}\n{table}\n")
        trace = self.out / f"rank_{self.rank}.json"
        tmp = trace.with_name(trace.name + f".tmp{os.getpid()}")
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, trace)
