"""Run a list of evaluation tasks against one backend and collect their results.

The one entry point both ``vpmoe eval`` and the tokenizer experiment use: a backend, task
names, options in; a results dict (per-task metrics, seconds per task, the backend's
description) out. Writing it to disk is ``report.py``'s job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from megatron_vpmoe.eval.tasks import DEFAULT_EVAL_DIR, resolve_tasks, task_runner
from megatron_vpmoe.inference.backend import Backend
from megatron_vpmoe.utils.progress import Progress


@dataclass
class EvalOptions:
    tasks: List[str] = field(default_factory=lambda: ["bpb"])
    limit: Optional[int] = None  # items per task
    eval_dir: Path = DEFAULT_EVAL_DIR
    bpb_text: Optional[Path] = None  # default: LAMBADA passages
    long_text: Optional[Path] = None  # default: LAMBADA passages, concatenated
    context: Optional[int] = None  # training context for long_context; default: backend.max_length
    gsm8k_shots: int = 5
    max_new_tokens: int = 256
    progress: bool = True


def run_eval(backend: Backend, options: EvalOptions, model_name: str = "") -> Dict[str, object]:
    names = resolve_tasks(",".join(options.tasks))
    context = options.context or backend.max_length
    results: Dict[str, object] = {"model": model_name, "backend": backend.describe(), "limit": options.limit,
                                  "tasks": {}, "seconds": {}}
    for number, name in enumerate(names, 1):
        progress = Progress(None, f"eval {name} ({number}/{len(names)})", "seq", enabled=options.progress)
        backend.on_scored = progress.update  # sequences scored, live (a bar, or a line every 10 s)
        run = task_runner(name, eval_dir=Path(options.eval_dir), limit=options.limit, bpb_text=options.bpb_text,
                          long_text=options.long_text, context=context, gsm8k_shots=options.gsm8k_shots,
                          max_new_tokens=options.max_new_tokens)
        saved_max = backend.max_length
        start = time.perf_counter()
        try:
            results["tasks"][name] = run(backend)  # type: ignore[index]
        finally:
            backend.max_length = saved_max
            backend.on_scored = None
            progress.close()
        results["seconds"][name] = time.perf_counter() - start  # type: ignore[index]
    return results
