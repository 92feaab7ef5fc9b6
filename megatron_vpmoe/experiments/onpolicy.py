"""The tokenizer experiment's on-policy stage: distil the best variant on-policy against a teacher, score before/after.

Config (``onpolicy:`` in the experiment YAML)::

    onpolicy:
      teacher: {toy: {gsm8k: PATH}}    # build the toy Harmony teacher and serve it (`vpmoe serve`), or
      # teacher: {url: http://HOST:PORT}   an OpenAI-compatible teacher already serving
      prompts: PATH                     # prompt jsonl (GSM8K records work); the first `prompt_limit`
      prompt_limit: 8
      steps: 20                         # on-policy optimizer steps
      set: [distill.onpolicy.max_new_tokens=24, ...]   # any run-config override

The student is the variant with the lowest mean held-out bits per byte, its first seed's final
checkpoint. :class:`megatron_vpmoe.distill.onpolicy.OnPolicyTrainer` runs the phase (resumable from
its own checkpoints). The teacher score is the on-policy trainer's own: the mean teacher score of
the student's sampled answers, averaged over the first quarter of the steps ("before": the
phase-1 student and its first updates) and over the last quarter ("after").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from megatron_vpmoe.utils.errors import ConfigError, InputError, VpmoeError

KEYS = ("teacher", "prompts", "prompt_limit", "steps", "set")


def check_onpolicy(raw, src: str, resolve) -> dict:
    """Validate the ``onpolicy`` section; paths made absolute."""
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping", key="onpolicy", file=src)
    for key in raw:
        if key not in KEYS:
            raise ConfigError(f"unknown key (known: {', '.join(KEYS)})", key=f"onpolicy.{key}", file=src)
    teacher = raw.get("teacher")
    if not (isinstance(teacher, dict) and len(teacher) == 1 and next(iter(teacher)) in ("toy", "url")):
        raise ConfigError("expected {toy: {gsm8k: PATH}} or {url: URL}", key="onpolicy.teacher", file=src)
    if "toy" in teacher:
        toy = teacher["toy"]
        if not (isinstance(toy, dict) and isinstance(toy.get("gsm8k"), str)):
            raise ConfigError("expected {gsm8k: PATH}", key="onpolicy.teacher.toy", file=src)
        teacher = {"toy": {**toy, "gsm8k": str(resolve(toy["gsm8k"]))}}
    if not isinstance(raw.get("prompts"), str):
        raise ConfigError("missing (a prompt jsonl)", key="onpolicy.prompts", file=src)
    prompts = resolve(raw["prompts"])
    if not prompts.is_file():
        raise ConfigError(f"{prompts} does not exist", key="onpolicy.prompts", file=src)
    for key, default in (("prompt_limit", 8), ("steps", 20)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError("expected an integer >= 1", key=f"onpolicy.{key}", file=src)
    sets = raw.get("set", []) or []
    if not isinstance(sets, list):
        raise ConfigError("expected a list of key=value", key="onpolicy.set", file=src)
    return {"teacher": teacher, "prompts": str(prompts), "prompt_limit": int(raw.get("prompt_limit", 8)),
            "steps": int(raw.get("steps", 20)), "set": [str(s) for s in sets]}


def best_run(rows: List[Dict], seeds: List[int]) -> Dict:
    """The first seed's row of the variant with the lowest mean held-out bits per byte."""
    means = {}
    for r in rows:
        means.setdefault(r["variant"], []).append(r["valid_bpb"])
    best = min(means, key=lambda v: sum(means[v]) / len(means[v]))
    return next(r for s in seeds for r in rows if r["variant"] == best and r["seed"] == s)


def run_onpolicy_stage(op: dict, out: Path, best: Dict, cfg, progress: bool = True) -> Dict:
    """Run (or resume) the on-policy phase (``op``: :func:`check_onpolicy`) from the run ``best``
    (its summary row; ``cfg`` its training config) under ``out``; returns the before/after result."""
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.config.loader import save_resolved_config
    from megatron_vpmoe.distill.onpolicy import OnPolicyTrainer
    from megatron_vpmoe.training.checkpoint import latest_checkpoint
    from megatron_vpmoe.utils.atomic import atomic_write_text

    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    student = latest_checkpoint(cfg.checkpoint_dir)
    if student is None:
        raise InputError(f"variant {best['variant']} seed {best['seed']}: no checkpoint in {cfg.checkpoint_dir}")
    prompts = out / "prompts.jsonl"
    if not prompts.is_file():
        with open(op["prompts"], encoding="utf-8") as f:
            lines = [line for _, line in zip(range(op["prompt_limit"]), f)]
        atomic_write_text(prompts, "".join(lines))
    base = save_resolved_config(cfg, out / "student.yaml")
    overrides = [f"run.dir={out / 'run'}", "checkpoint.dir=null", f"checkpoint.load={student}",
                 f"distill.onpolicy.prompts=[{prompts}]", f"train.steps={op['steps']}", "train.eval_interval=0",
                 "train.schedule.kind=constant", "train.schedule.warmup_steps=0", *op["set"]]
    if "toy" in op["teacher"]:
        from megatron_vpmoe.distill.toy_teacher import build_toy_teacher
        from megatron_vpmoe.serve.process import ServedModel

        toy = dict(op["teacher"]["toy"])
        teacher_dir = out / "teacher"
        if not (teacher_dir / "config.json").is_file():
            build_toy_teacher(toy.pop("gsm8k"), str(teacher_dir), **toy)
        teacher_name = "the toy Harmony GSM8K teacher (vpmoe serve)"
        with ServedModel(teacher_dir, out / "serve.log") as server:
            OnPolicyTrainer(load_config(str(base), overrides + [f"distill.teacher_url={server.url}"]),
                            quiet=not progress).run()
    else:
        teacher_name = op["teacher"]["url"]
        OnPolicyTrainer(load_config(str(base), overrides + [f"distill.teacher_url={teacher_name}"]),
                        quiet=not progress).run()
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    scores = [r["teacher_score"] for r in records if r.get("teacher_score") is not None]
    if not scores:
        raise VpmoeError(f"{out / 'run' / 'metrics.jsonl'}: no teacher scores logged")
    k = max(1, len(scores) // 4)
    result = {"variant": best["variant"], "seed": best["seed"], "student_checkpoint": str(student),
              "teacher": teacher_name, "steps": len(scores), "score_before": sum(scores[:k]) / k,
              "score_after": sum(scores[-k:]) / k, "window_steps": k, "scores": scores,
              "kl_final": records[-1].get("kl")}
    atomic_write_text(result_file, json.dumps(result, indent=1) + "\n")
    return result
