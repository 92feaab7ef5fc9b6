"""``vpmoe experiment tokenizers``: compare tokenizer variants end to end, over seeds, at equal bytes and equal FLOPs.

For an experiment config (``examples/experiments/tokenizers-cpu.yaml``): read the corpus sources
once (:mod:`.corpus`: text, JSONL fields, Harmony chat records), write the same documents for
every variant, get each variant's tokenizer (an existing directory, the o200k Harmony teacher
tokenizer, or one trained by the library's :func:`megatron_vpmoe.tokenizers.train_tokenizer`),
preprocess each split once into every variant's shards (with role masks for chat documents),
then train every variant with every seed (``run.seed``: model init and data order) on the same
bytes of text with the project's trainer and role-aware objective (only ``model.vocab_size``
differs), evaluate, and write one report (:mod:`.report`).

Input paths in the config are relative to the config file, or ``data:REL`` for ``REL`` in the
data folder (``utils.paths.data_dir``: ``$VPMOE_DATA``, ``../shared/data``, else the default
embedded in the package, as the quickstart reads); on the embedded default, corpus entries and
eval tasks whose files it does not hold are skipped with a notice. ``out`` is relative to the current
directory. Resumable per run: every stage's output lives under ``OUT/<variant>/`` (tokenizer)
and ``OUT/<variant>/seed-<s>/`` (the trainer's checkpoints, which it resumes from, eval results,
``summary.json``); a stage whose output is complete is skipped. With ``launch`` the training
runs become SLURM jobs (one per variant x seed, see :func:`write_slurm_jobs`); re-running the
experiment afterwards evaluates them and gathers the report.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_vpmoe.experiments.corpus import (
    SOURCE_KINDS, Source, documents_digest, parse_source, read_splits, read_written, write_documents)
from megatron_vpmoe.experiments.stats import smooth, spike_count
from megatron_vpmoe.utils.errors import ConfigError, InputError

TOKENIZER_KINDS = ("dir", "harmony", "train", "bpe")
KNOWN_KEYS = ("out", "base_config", "set", "corpus", "train_bytes", "valid_bytes", "tokenizer_train_bytes",
              "seeds", "eval", "variants", "max_stage", "onpolicy")


@dataclass
class Variant:
    name: str
    kind: str  # dir | harmony | train | bpe
    spec: object  # the directory, {} , {kind, vocab_size, ...options}, or {vocab_size}
    reference: bool = False
    stage: int = 1  # the planned order: stage N runs after stage N-1 (max_stage selects)


@dataclass
class ExperimentConfig:
    out: Path
    base_config: Path
    overrides: List[str]
    corpus: List[Source]
    train_bytes: int
    valid_bytes: int
    tokenizer_train_bytes: int
    seeds: List[int]
    eval_tasks: List[str]
    eval_limit: Optional[int]
    bpb_text: Optional[Path]
    long_text: Optional[Path]
    variants: List[Variant] = field(default_factory=list)
    onpolicy: Optional[dict] = None
    source: str = ""


def _apply_overrides(raw: dict, overrides: Sequence[str], src: str) -> None:
    """``key=value`` (``train_bytes=2e5``, ``eval.limit=10``, ``seeds=[1,2]``), values parsed as YAML."""
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}", key="--set")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("not a section", key=key, file=src)
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "2e5" as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        node[leaf] = int(parsed) if isinstance(parsed, float) and parsed.is_integer() else parsed


def _variant(v, i: int, src: str, resolve) -> Variant:
    key = f"variants[{i}]"
    if not isinstance(v, dict) or "name" not in v or "tokenizer" not in v:
        raise ConfigError("each variant needs 'name' and 'tokenizer'", key=key, file=src)
    for k in v:
        if k not in ("name", "tokenizer", "reference", "stage"):
            raise ConfigError("unknown key (known: name, tokenizer, reference, stage)", key=f"{key}.{k}", file=src)
    tok = v["tokenizer"]
    if not isinstance(tok, dict) or len(tok) != 1 or next(iter(tok)) not in TOKENIZER_KINDS:
        raise ConfigError("tokenizer must be one of {dir: PATH}, {harmony: {}}, "
                          "{train: {kind: K, vocab_size: N, ...}}, {bpe: {vocab_size: N}}",
                          key=f"{key}.tokenizer", file=src)
    kind, spec = next(iter(tok.items()))
    if kind == "dir":
        spec = resolve(str(spec))
    elif kind == "harmony":
        spec = {}
    elif kind == "bpe":
        if not (isinstance(spec, dict) and isinstance(spec.get("vocab_size"), int)):
            raise ConfigError("expected {vocab_size: N}", key=f"{key}.tokenizer.bpe", file=src)
        kind, spec = "train", {"kind": "bpe", **spec}
    elif not (isinstance(spec, dict) and isinstance(spec.get("kind"), str) and isinstance(spec.get("vocab_size"), int)):
        raise ConfigError("expected {kind: bpe|unigram|lengthmax|pruned, vocab_size: N, ...}",
                          key=f"{key}.tokenizer.train", file=src)
    stage = v.get("stage", 1)
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 1:
        raise ConfigError("expected an integer >= 1", key=f"{key}.stage", file=src)
    return Variant(str(v["name"]), kind, spec, bool(v.get("reference", False)), stage)


def load_experiment_config(path: str | Path, out: Optional[str] = None,
                           overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Parse and check an experiment config (input paths relative to it; ``out`` to the cwd)."""
    from megatron_vpmoe.config.loader import read_yaml

    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise InputError(f"{path}: no such experiment config")
    raw = read_yaml(path)  # one line for bad YAML, duplicate keys, binary files
    _apply_overrides(raw, overrides, src)
    for key in raw:
        if key not in KNOWN_KEYS:
            raise ConfigError(f"unknown key (known: {', '.join(sorted(KNOWN_KEYS))})", key=str(key), file=src)
    here = path.resolve().parent
    from megatron_vpmoe.utils.paths import data_dir, embedded_data_dir

    data = data_dir()
    embedded = data.resolve() == embedded_data_dir().resolve()

    def resolve(p: str) -> Path:
        if p.startswith(DATA_PREFIX):
            return data / p[len(DATA_PREFIX):]
        q = Path(p).expanduser()
        return q if q.is_absolute() else here / q

    def absent_from_embedded(p) -> bool:
        """A ``data:`` path the embedded default does not hold: skipped there, with a notice."""
        return embedded and isinstance(p, str) and p.startswith(DATA_PREFIX) and not resolve(p).exists()

    def need(key, kind):
        if key not in raw:
            raise ConfigError("missing", key=key, file=src)
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise ConfigError(f"expected {getattr(kind, '__name__', kind)}", key=key, file=src)
        return raw[key]

    def byte_count(key, default=None):
        """A byte budget: a positive integer (``2e5`` and ``200000.0`` are accepted as whole numbers)."""
        if default is None and key not in raw:
            raise ConfigError("missing", key=key, file=src)
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < math.inf \
                or value != int(value):
            raise ConfigError(f"expected a positive whole number of bytes, got {value!r}", key=key, file=src)
        return int(value)

    # checked before the corpus is looked at: a bad budget is the key's fault, not the files'
    budgets = {"train_bytes": byte_count("train_bytes"), "valid_bytes": byte_count("valid_bytes", 50_000),
               "tokenizer_train_bytes": byte_count("tokenizer_train_bytes", 1_000_000)}
    corpus = need("corpus", (str, list, dict))
    corpus = corpus if isinstance(corpus, list) else [corpus]
    kept = []
    for i, c in enumerate(corpus):
        given = next((c[k] for k in SOURCE_KINDS if k in c), None) if isinstance(c, dict) else c
        if absent_from_embedded(given):
            _skip_notice(f"corpus[{i}]: {given} is not in the embedded default data ({data})")
            continue
        kept.append(parse_source(c, f"corpus[{i}]", src, resolve))
    if not kept:
        raise ConfigError("no corpus source exists in the data folder " + str(data), key="corpus", file=src)
    sources = kept
    ev = raw.get("eval", {}) or {}
    if not isinstance(ev, dict):
        raise ConfigError("expected a mapping", key="eval", file=src)
    for key in ev:
        if key not in ("tasks", "limit", "bpb_text", "long_text"):
            raise ConfigError("unknown key (known: tasks, limit, bpb_text, long_text)", key=f"eval.{key}", file=src)
    variants = [_variant(v, i, src, resolve) for i, v in enumerate(need("variants", list))]
    names = [v.name for v in variants]
    if len(set(names)) != len(names) or not names:
        raise ConfigError("variant names must be unique and at least one variant given", key="variants", file=src)
    max_stage = raw.get("max_stage")
    if max_stage is not None:
        if not isinstance(max_stage, int) or isinstance(max_stage, bool):
            raise ConfigError("expected an integer", key="max_stage", file=src)
        variants = [v for v in variants if v.stage <= max_stage]
        if not variants:
            raise ConfigError(f"no variant has stage <= {max_stage}", key="max_stage", file=src)
    seeds = raw.get("seeds", [1234])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ConfigError("expected a non-empty list of distinct integers", key="seeds", file=src)
    base = resolve(str(need("base_config", str)))
    if not base.is_file():
        raise ConfigError(f"{base} does not exist", key="base_config", file=src)
    sets = raw.get("set", []) or []
    if not isinstance(sets, list):
        raise ConfigError("expected a list of key=value", key="set", file=src)
    onpolicy = raw.get("onpolicy")
    if onpolicy is not None:
        from megatron_vpmoe.experiments.onpolicy import check_onpolicy

        onpolicy = check_onpolicy(onpolicy, src, resolve)
    return ExperimentConfig(
        out=Path(out or str(need("out", str))).expanduser().absolute(),
        base_config=base, overrides=[str(o) for o in sets], corpus=sources,
        **budgets, seeds=list(seeds),
        eval_tasks=_present_tasks(list(ev.get("tasks", ["bpb", "long_context"])), data / "eval", embedded),
        eval_limit=ev.get("limit"),
        bpb_text=resolve(ev["bpb_text"]) if ev.get("bpb_text") else None,
        long_text=resolve(ev["long_text"]) if ev.get("long_text") else None,
        variants=variants, onpolicy=onpolicy, source=src,
    )


DATA_PREFIX = "data:"  # a config path in the data folder (utils.paths.data_dir)


def _skip_notice(what: str) -> None:
    import sys

    print(f"vpmoe experiment: {what}; skipped (the ../shared data has it)", file=sys.stderr, flush=True)


def _present_tasks(tasks: List[str], eval_dir: Path, embedded: bool) -> List[str]:
    """``tasks``, less those whose data file the embedded default does not hold (on the embedded default only)."""
    if not embedded:
        return tasks
    from megatron_vpmoe.eval.tasks import task_data_file

    kept = []
    for name in tasks:
        needed = task_data_file(name, eval_dir)
        if needed is not None and not needed.is_file():
            _skip_notice(f"eval task {name}: {needed} is not in the embedded default data")
            continue
        kept.append(name)
    return kept


# ---- shared stages: documents, tokenizers, shards ------------------------------------------

def shard_prefix(out: Path, split: str, variant: str) -> str:
    return str(out / "shards" / f"{split}.{variant}_text_document")


def obtain_tokenizer(variant: Variant, out: Path, train_documents: Path, max_bytes: int) -> Path:
    """The variant's tokenizer directory: an existing one, or made under ``out`` (atomically) by
    the library: the o200k Harmony tokenizer, or one trained on the experiment's training documents."""
    if variant.kind == "dir":
        if not Path(variant.spec).is_dir():
            raise InputError(f"variant {variant.name}: tokenizer directory {variant.spec} not found")
        return Path(variant.spec)
    if out.is_dir():
        return out  # done earlier (written atomically)
    if variant.kind == "harmony":
        from megatron_vpmoe.tokenizers import harmony_tokenizer

        harmony_tokenizer().save(str(out))
        return out
    from megatron_vpmoe.tokenizers import train_tokenizer

    spec = dict(variant.spec)
    kind, vocab = spec.pop("kind"), spec.pop("vocab_size")
    limit = spec.pop("max_bytes", max_bytes)
    try:
        train_tokenizer(kind, [f"{train_documents}:text"], vocab, output=str(out), max_bytes=limit,
                        name=variant.name, **spec)
    except TypeError as err:  # an option the trainer does not take
        raise InputError(f"variant {variant.name}: tokenizer option not understood ({err})") from None
    return out


def prepare(exp: ExperimentConfig) -> dict:
    """Documents, tokenizers and shards shared by every run; returns what the runs need."""
    from megatron_vpmoe.data.preprocess import PreprocessOptions, run_preprocess

    docs_file = exp.out / "documents" / "train.jsonl"
    if docs_file.is_file() and (exp.out / "documents" / "valid.jsonl").is_file():
        train_docs = read_written(docs_file)  # the documents of the first run, whatever the sources say now
        valid_docs = read_written(exp.out / "documents" / "valid.jsonl")
    else:
        splits = read_splits(exp.corpus, {"train": exp.train_bytes, "valid": exp.valid_bytes})
        train_docs, valid_docs = splits["train"], splits["valid"]
    documents = write_documents(exp.out, {"train": train_docs, "valid": valid_docs})
    tok_dirs: Dict[str, Path] = {}
    tok_times: Dict[str, float] = {}
    for variant in exp.variants:
        t0 = time.perf_counter()
        tok_dirs[variant.name] = obtain_tokenizer(variant, exp.out / variant.name / "tokenizer",
                                                  documents["train"], exp.tokenizer_train_bytes)
        tok_times[variant.name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shards = {split: run_preprocess(PreprocessOptions([str(path)], str(exp.out / "shards" / split),
                                                      {k: str(v) for k, v in tok_dirs.items()},
                                                      json_keys=["text"], progress=False))
              for split, path in documents.items()}
    return {"train_docs": train_docs, "valid_docs": valid_docs, "documents": documents, "tok_dirs": tok_dirs,
            "tok_times": tok_times, "shards": shards,
            "preprocess_s": (time.perf_counter() - t0) / len(exp.variants),  # one shared pass, split evenly
            "documents_sha256": {split: documents_digest(d) for split, d in
                                 (("train", train_docs), ("valid", valid_docs))}}


# ---- one run: a variant with a seed ----------------------------------------------------------

def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def run_dir(exp: ExperimentConfig, variant: str, seed: int) -> Path:
    return exp.out / variant / f"seed-{seed}"


def run_config(exp: ExperimentConfig, variant: Variant, seed: int, prep: dict, in_process: bool = True):
    """The run's training config: the base config with the variant's vocabulary and shards, the
    seed, and as many steps as it takes to see ``train_bytes`` of text with this tokenizer."""
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.tokenizers import load as load_tokenizer

    tok_dir = prep["tok_dirs"][variant.name]
    tok = load_tokenizer(tok_dir)
    rdir = run_dir(exp, variant.name, seed)
    cfg = load_config(str(exp.base_config), exp.overrides + [
        f"model.vocab_size={_round_up(tok.vocab_size)}", f"run.dir={rdir / 'run'}",
        f"run.name={variant.name}-seed-{seed}", f"run.seed={seed}",
        f"data.tokenizer={Path(tok_dir).resolve()}", "data.mock=false",
        f"data.blend=[[1.0, {shard_prefix(exp.out, 'train', variant.name)}]]", "data.split=100,0,0",
        "log.progress_bar=false", "checkpoint.dir=null", "checkpoint.load=auto"])
    n_tokens, train_bytes = _train_tokens(prep, variant.name)
    t = cfg.train
    steps = max(1, math.ceil(exp.train_bytes / (t.global_batch_size * cfg.data.seq_length * train_bytes / n_tokens)))
    cfg.train.steps = steps
    cfg.train.schedule.warmup_steps = min(cfg.train.schedule.warmup_steps, steps // 4)
    if not in_process:  # a `vpmoe train` job has no held-out split; validation is the gather stage's
        cfg.train.eval_interval = 0
    elif cfg.train.eval_interval:
        cfg.train.eval_interval = max(1, min(cfg.train.eval_interval, steps))
    cfg.validate()
    return cfg, tok


def _train_tokens(prep: dict, variant: str) -> tuple:
    """(tokens without the EOD tokens, UTF-8 bytes) of the training documents for ``variant``."""
    docs = prep["train_docs"]
    n_tokens = prep["shards"]["train"]["tokens_per_variant"][variant] - len(docs)
    return max(n_tokens, 1), sum(len(d.encode("utf-8")) for d in docs)


def train_run(exp: ExperimentConfig, variant: Variant, seed: int, prep: dict, quiet: bool = True):
    """Train (or resume) one run in this process; returns its config."""
    from megatron_vpmoe.data.dataset import build_datasets
    from megatron_vpmoe.training.checkpoint import latest_checkpoint, read_trainer_state
    from megatron_vpmoe.training.trainer import Trainer

    cfg, tok = run_config(exp, variant, seed, prep)
    done = latest_checkpoint(cfg.checkpoint_dir)
    if done is not None and read_trainer_state(done)["step"] >= cfg.train.steps:
        return cfg
    t = cfg.train
    # megatron-core GPT datasets over the variant's shards (the trainer's data path; run.seed sets
    # the sample order); validation reads the held-out split's shards
    samples = {"train": t.steps * t.global_batch_size, "valid": max(1, t.eval_iters) * t.global_batch_size}
    train_set, valid_set = (
        build_datasets(replace(cfg.data, blend=[[1.0, shard_prefix(exp.out, split, variant.name)]]),
                       seed=seed, num_samples=(samples[split], 0, 0), eod_id=tok.eod_id, pad_id=tok.pad_id,
                       cache_dir=str(run_dir(exp, variant.name, seed) / "data_cache"),
                       vocab_size=cfg.model.vocab_size)[0]
        for split in ("train", "valid"))
    code = Trainer(cfg, datasets=(train_set, valid_set), quiet=quiet).run()
    if code != 0:
        raise InputError(f"variant {variant.name} seed {seed}: training stopped with exit code {code}")
    return cfg


def _records(run: Path) -> List[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stability(train_recs: List[dict]) -> Dict[str, Optional[float]]:
    """Loss spikes, max grad norm, expert load max/mean (over layers and steps) and router entropy."""
    loads = [sum(r["expert_load_max_over_mean"]) / len(r["expert_load_max_over_mean"])
             for r in train_recs if r.get("expert_load_max_over_mean")]
    entropy = [sum(r["router_entropy"]) / len(r["router_entropy"]) for r in train_recs if r.get("router_entropy")]
    return {
        "loss_spikes": spike_count([r["loss"] for r in train_recs]),
        "max_grad_norm": max((r["grad_norm"] for r in train_recs), default=None),
        "expert_load_max_over_mean": sum(loads) / len(loads) if loads else None,
        "expert_load_max_over_mean_peak": max(loads) if loads else None,
        "router_entropy": sum(entropy) / len(entropy) if entropy else None,
        "router_entropy_final": entropy[-1] if entropy else None,
    }


def summarize_run(exp: ExperimentConfig, variant: Variant, seed: int, prep: dict, cfg, seconds: Dict[str, float],
                  progress: bool = False) -> Dict[str, object]:
    """Evaluate a trained run and write its summary row (``summary.json``)."""
    from megatron_vpmoe.eval.harness import EvalOptions, run_eval
    from megatron_vpmoe.inference.native import NativeBackend
    from megatron_vpmoe.eval.report import write_results
    from megatron_vpmoe.eval.tasks import run_bits_per_byte
    from megatron_vpmoe.model.params import count_parameters
    from megatron_vpmoe.training.metrics import flops_per_token
    from megatron_vpmoe.utils.atomic import atomic_write_text

    rdir = run_dir(exp, variant.name, seed)
    t0 = time.perf_counter()
    results_file = rdir / "eval" / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
    else:
        backend = NativeBackend(str(cfg.checkpoint_dir), max_length=cfg.data.seq_length)
        options = EvalOptions(tasks=exp.eval_tasks, limit=exp.eval_limit, bpb_text=exp.bpb_text,
                              long_text=exp.long_text, context=cfg.data.seq_length, progress=progress,
                              max_new_tokens=64, gsm8k_shots=2)
        results = run_eval(backend, options, model_name=f"{variant.name} seed {seed}")
        # held-out documents of the experiment's own corpus, every token scored (Harmony chats included)
        results["heldout"] = run_bits_per_byte(backend, prep["documents"]["valid"], None, progress=progress)
        write_results(results, rdir / "eval")
    seconds["eval_s"] = time.perf_counter() - t0

    records = _records(rdir / "run")
    train_recs = [r for r in records if r.get("kind") == "train" and not r.get("skipped")]
    valid_recs = [r for r in records if r.get("kind") == "valid"]
    n_tokens, train_bytes = _train_tokens(prep, variant.name)
    bytes_per_token = train_bytes / n_tokens
    seq = cfg.data.seq_length
    flops_tok = flops_per_token(cfg.model, seq)
    per_step = {r["step"]: r["consumed_samples"] * seq for r in train_recs}

    def point(r, tokens):
        return {"step": r["step"], "bytes_seen": tokens * bytes_per_token, "flops": tokens * flops_tok,
                "loss": r["loss"], "bits_per_byte": r.get("bits_per_byte")}

    curve = [point(r, per_step[r["step"]]) for r in train_recs]
    window = max(1, len(curve) // 10)  # the training bpb of a step is one batch: smoothed over 10% of the run
    for p, s in zip(curve, smooth([p["bits_per_byte"] for p in curve], window)):
        p["bits_per_byte_smoothed"] = s
    valid_curve = [point(r, r["step"] * cfg.train.global_batch_size * seq) for r in valid_recs]
    seconds["train_s"] = sum(r.get("step_time_s", 0.0) for r in records if r.get("kind") == "train")
    counts = count_parameters(cfg.model)
    tasks = results["tasks"]
    scores = {name: m.get("acc", m.get("exact_match")) for name, m in tasks.items()
              if "acc" in m or "exact_match" in m}
    long = tasks.get("long_context", {})
    tok_dir = prep["tok_dirs"][variant.name]
    from megatron_vpmoe.tokenizers import load as load_tokenizer

    summary = {
        "variant": variant.name, "seed": seed, "reference": variant.reference, "stage": variant.stage,
        "tokenizer": str(tok_dir), "vocab_size": load_tokenizer(tok_dir).vocab_size,
        "model_vocab_size": cfg.model.vocab_size,
        "documents_sha256": prep["documents_sha256"]["train"], "train_documents_bytes": train_bytes,
        "tokens_per_char": n_tokens / max(sum(len(d) for d in prep["train_docs"]), 1),
        "bytes_per_token": bytes_per_token, "train_tokens": n_tokens, "train_bytes_budget": exp.train_bytes,
        "embedding_head_params": counts.embedding_head, "active_params": counts.active,
        "embedding_head_share_of_active": counts.embedding_head / counts.active,
        "active_non_embedding_params": counts.active - counts.embedding_head, "total_params": counts.total,
        "flops_per_token": flops_tok, "steps": cfg.train.steps,
        "bytes_seen": curve[-1]["bytes_seen"] if curve else 0.0, "flops": curve[-1]["flops"] if curve else 0.0,
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
        "final_train_bpb": curve[-1]["bits_per_byte_smoothed"] if curve else None,
        "skipped_steps": sum(1 for r in records if r.get("kind") == "train" and r.get("skipped")),
        "valid_loss": valid_recs[-1]["loss"] if valid_recs else None,
        "valid_bpb": results["heldout"]["bpb"],
        "eval_bpb": tasks.get("bpb", {}).get("bpb"), "scores": scores,
        "long_context_degradation": long.get("degradation"), "long_context": long,
        **stability(train_recs),
        "curve": curve, "valid_curve": valid_curve, "seconds": seconds, "wall_time_s": sum(seconds.values()),
    }
    atomic_write_text(rdir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def runs(exp: ExperimentConfig) -> List[tuple]:
    """Every (variant, seed) pair, variants in the config's (planned) order."""
    return [(v, s) for v in exp.variants for s in exp.seeds]


def run_tokenizer_experiment(config: str, out: Optional[str] = None, overrides: Sequence[str] = (),
                             progress: bool = True) -> Path:
    """Run (or resume) every variant x seed, then write the report; returns the report path."""
    from megatron_vpmoe.experiments.report import write_experiment_report

    exp = load_experiment_config(config, out, overrides)
    prep = prepare(exp)
    rows = []
    todo = runs(exp)
    for i, (variant, seed) in enumerate(todo):
        summary_file = run_dir(exp, variant.name, seed) / "summary.json"
        if summary_file.is_file():
            rows.append(json.loads(summary_file.read_text()))
            continue
        if progress:
            print(f"[{i + 1}/{len(todo)}] {variant.name} seed {seed}", flush=True)
        t0 = time.perf_counter()
        cfg = train_run(exp, variant, seed, prep)
        seconds = {"tokenizer_s": prep["tok_times"][variant.name], "preprocess_s": prep["preprocess_s"],
                   "train_s": time.perf_counter() - t0}
        rows.append(summarize_run(exp, variant, seed, prep, cfg, seconds))
    onpolicy = None
    if exp.onpolicy:
        from megatron_vpmoe.experiments.onpolicy import best_run, run_onpolicy_stage

        best = best_run(rows, exp.seeds)
        cfg, _ = run_config(exp, next(v for v in exp.variants if v.name == best["variant"]), best["seed"], prep)
        onpolicy = run_onpolicy_stage(exp.onpolicy, exp.out / "onpolicy", best, cfg, progress=progress)
    report = write_experiment_report(rows, exp.out, onpolicy=onpolicy)
    if progress:
        print(report.read_text())
        print(f"wrote {report}")
    return report


# ---- SLURM: one job per variant x seed ----------------------------------------------------------

def write_slurm_jobs(config: str, out: Optional[str] = None, overrides: Sequence[str] = (), *, dry_run: bool,
                     job_options: Optional[dict] = None) -> List[Path]:
    """Prepare the shared stages here, then write (and unless ``dry_run`` submit) one ``vpmoe train``
    sbatch job per variant x seed: ``OUT/<variant>/seed-<s>/train.yaml`` and ``OUT/launch/<job>.sbatch``.
    The jobs resume from their checkpoints when requeued; re-running the experiment without
    ``--launch`` afterwards evaluates them and gathers one report. Returns the scripts' paths."""
    from megatron_vpmoe.config.loader import save_resolved_config
    from megatron_vpmoe.launch.slurm import SlurmJob, render_sbatch, write_and_submit
    from megatron_vpmoe.utils.atomic import atomic_write_text

    exp = load_experiment_config(config, out, overrides)
    prep = prepare(exp)
    jobs = []
    for variant, seed in runs(exp):
        cfg, _ = run_config(exp, variant, seed, prep, in_process=False)
        cfg.data.cache_dir = str(run_dir(exp, variant.name, seed) / "data_cache")
        train_yaml = save_resolved_config(cfg, run_dir(exp, variant.name, seed) / "train.yaml")
        job = SlurmJob(config=str(train_yaml), workdir=str(Path.cwd()), **(job_options or {}))
        jobs.append((job, render_sbatch(job)))  # refuses what the trainer would: no script is written then
    scripts = []
    for job, rendered in jobs:
        path = exp.out / "launch" / f"{rendered[2]}.sbatch"
        atomic_write_text(path, rendered[0])
        scripts.append(path)
        if not dry_run:
            write_and_submit(job, rendered=rendered)
    print("\n".join(f"{'wrote' if dry_run else 'submitted'} {p}" for p in scripts))
    return scripts
