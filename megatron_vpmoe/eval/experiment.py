"""``vpmoe experiment tokenizers``: compare tokenizer variants end to end on model quality.

For each variant of an experiment config (``examples/experiments/tokenizers.yaml``): get the
tokenizer (an existing directory, ``vpmoe tokenizer train`` with the variant's arguments, or a
byte-level BPE trained with the ``tokenizers`` library for presets), tokenize the same
documents, train the same model budget (the same UTF-8 bytes of text; the same active
non-embedding parameters: only ``model.vocab_size`` differs) with the project's trainer,
evaluate with the harness, and write one report (``report.md``/``report.json`` + plots, see
``experiment_report.py``).

Resumable per variant: every stage's output lives under ``OUT/<variant>/`` and a stage whose
output is complete is skipped (the tokenizer directory, the trainer's checkpoints, which it
resumes from, ``eval/results.json`` and finally ``summary.json``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_vpmoe.utils.errors import ConfigError, InputError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_KINDS = ("dir", "command", "bpe")


@dataclass
class Variant:
    name: str
    kind: str  # dir | command | bpe
    spec: object  # the directory, the argument list, or {vocab_size, ...}
    reference: bool = False


@dataclass
class ExperimentConfig:
    out: Path
    base_config: Path
    overrides: List[str]
    corpus: List[Path]
    train_bytes: int
    valid_bytes: int
    tokenizer_train_bytes: int
    eval_tasks: List[str]
    eval_limit: Optional[int]
    bpb_text: Optional[Path]
    long_text: Optional[Path]
    variants: List[Variant] = field(default_factory=list)
    source: str = ""


def _resolve(path: str, base: Path) -> Path:
    """A path in the config: absolute, or relative to the project root (like every config path)."""
    p = Path(path)
    return p if p.is_absolute() else (base / p)


def load_experiment_config(path: str | Path, out: Optional[str] = None,
                           overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Parse and check an experiment config; ``overrides`` are ``key=value`` (``train_bytes=2e5``,
    ``eval.limit=10``; values parsed as YAML)."""
    import yaml

    from megatron_vpmoe.config.loader import read_yaml

    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise InputError(f"{path}: no such experiment config")
    raw = read_yaml(path)  # one line for bad YAML, duplicate keys, binary files
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
    known = {"out", "base_config", "set", "corpus", "train_bytes", "valid_bytes", "tokenizer_train_bytes",
             "eval", "variants"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key (known: {', '.join(sorted(known))})", key=str(key), file=src)

    def need(key, kind):
        if key not in raw:
            raise ConfigError("missing", key=key, file=src)
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise ConfigError(f"expected {getattr(kind, '__name__', kind)}", key=key, file=src)
        return raw[key]

    root = PROJECT_ROOT
    corpus = need("corpus", (str, list))
    corpus = [corpus] if isinstance(corpus, str) else corpus
    corpus_paths = []
    for i, c in enumerate(corpus):
        p = _resolve(str(c), root)
        if not p.exists():
            raise ConfigError(f"{p} does not exist", key=f"corpus[{i}]", file=src)
        if "eval" in p.parts and "data" in p.parts:
            raise ConfigError("training on ../shared/data/eval is not allowed", key=f"corpus[{i}]", file=src)
        corpus_paths.append(p)
    ev = raw.get("eval", {}) or {}
    if not isinstance(ev, dict):
        raise ConfigError("expected a mapping", key="eval", file=src)
    for key in ev:
        if key not in ("tasks", "limit", "bpb_text", "long_text"):
            raise ConfigError("unknown key (known: tasks, limit, bpb_text, long_text)", key=f"eval.{key}", file=src)
    variants = []
    for i, v in enumerate(need("variants", list)):
        key = f"variants[{i}]"
        if not isinstance(v, dict) or "name" not in v or "tokenizer" not in v:
            raise ConfigError("each variant needs 'name' and 'tokenizer'", key=key, file=src)
        tok = v["tokenizer"]
        if not isinstance(tok, dict) or len(tok) != 1 or next(iter(tok)) not in TOKENIZER_KINDS:
            raise ConfigError(f"tokenizer must be one of {{dir: PATH}}, {{command: [ARGS]}}, "
                              f"{{bpe: {{vocab_size: N}}}}", key=f"{key}.tokenizer", file=src)
        kind, spec = next(iter(tok.items()))
        if kind == "dir":
            spec = _resolve(str(spec), root)
        elif kind == "command" and not (isinstance(spec, list) and all(isinstance(a, (str, int, float)) for a in spec)):
            raise ConfigError("expected a list of arguments", key=f"{key}.tokenizer.command", file=src)
        elif kind == "bpe" and not (isinstance(spec, dict) and isinstance(spec.get("vocab_size"), int)):
            raise ConfigError("expected {vocab_size: N}", key=f"{key}.tokenizer.bpe", file=src)
        variants.append(Variant(str(v["name"]), kind, spec, bool(v.get("reference", False))))
    names = [v.name for v in variants]
    if len(set(names)) != len(names) or not names:
        raise ConfigError("variant names must be unique and at least one variant given", key="variants", file=src)
    base = _resolve(str(need("base_config", str)), root)
    if not base.is_file():
        raise ConfigError(f"{base} does not exist", key="base_config", file=src)
    overrides = raw.get("set", []) or []
    if not isinstance(overrides, list):
        raise ConfigError("expected a list of key=value", key="set", file=src)
    return ExperimentConfig(
        out=_resolve(out or str(need("out", str)), root),
        base_config=base, overrides=[str(o) for o in overrides], corpus=corpus_paths,
        train_bytes=int(need("train_bytes", int)), valid_bytes=int(raw.get("valid_bytes", 50_000)),
        tokenizer_train_bytes=int(raw.get("tokenizer_train_bytes", 1_000_000)),
        eval_tasks=list(ev.get("tasks", ["bpb", "long_context"])), eval_limit=ev.get("limit"),
        bpb_text=_resolve(ev["bpb_text"], root) if ev.get("bpb_text") else None,
        long_text=_resolve(ev["long_text"], root) if ev.get("long_text") else None,
        variants=variants, source=src,
    )


# ---- documents --------------------------------------------------------------------------

def corpus_files(paths: List[Path]) -> List[Path]:
    """The corpus files, in order: files as given, directories as their .txt then .py files."""
    files: List[Path] = []
    for p in paths:
        files += sorted(p.rglob("*.txt")) + sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return files


def read_corpus(paths: List[Path], max_bytes: int) -> List[str]:
    """Documents (one per .txt file, or blank-line-separated paragraphs of long files), in order,
    up to ``max_bytes`` UTF-8 bytes in all."""
    docs: List[str] = []
    total = 0
    for f in corpus_files(paths):
        text = f.read_text(encoding="utf-8", errors="replace")
        for para in (text.split("\n\n") if len(text) > 20_000 else [text]):
            if not para.strip():
                continue
            docs.append(para + "\n")
            total += len(docs[-1].encode("utf-8"))
            if total >= max_bytes:
                return docs
    if not docs:
        raise InputError(f"{', '.join(map(str, paths))}: no text")
    return docs


def write_documents(out: Path, train_docs: List[str], valid_docs: List[str]) -> Dict[str, Path]:
    """The experiment's documents as ``documents/{train,valid}.jsonl`` (``text``), written once."""
    from megatron_vpmoe.utils.atomic import atomic_write_text

    paths = {}
    for split, docs in (("train", train_docs), ("valid", valid_docs)):
        path = out / "documents" / f"{split}.jsonl"
        if not path.is_file():
            atomic_write_text(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
        paths[split] = path
    return paths


def preprocess_documents(out: Path, documents: Dict[str, Path], tokenizers: Dict[str, Path]) -> Dict[str, dict]:
    """One ``vpmoe preprocess`` pass per split over the same documents for every variant;
    returns ``{split: summary}`` (shards ``shards/{split}.{variant}_text_document``)."""
    from megatron_vpmoe.data.preprocess import PreprocessOptions, run_preprocess

    return {split: run_preprocess(PreprocessOptions([str(path)], str(out / "shards" / split),
                                                    {k: str(v) for k, v in tokenizers.items()},
                                                    json_keys=["text"], progress=False))
            for split, path in documents.items()}


def shard_prefix(out: Path, split: str, variant: str) -> str:
    return str(out / "shards" / f"{split}.{variant}_text_document")


# ---- stages -----------------------------------------------------------------------------

def obtain_tokenizer(variant: Variant, out: Path, corpus_docs: List[str], corpus_paths: List[Path]) -> Path:
    """The variant's tokenizer directory (created under ``out`` unless it is an existing one)."""
    from megatron_vpmoe.utils.atomic import atomic_directory

    if variant.kind == "dir":
        if not Path(variant.spec).is_dir():
            raise InputError(f"variant {variant.name}: tokenizer directory {variant.spec} not found")
        return Path(variant.spec)
    if out.is_dir():
        return out  # done earlier (written atomically)
    if variant.kind == "command":
        from megatron_vpmoe.cli import main

        args = []  # "{corpus}" alone becomes one argument per corpus file (directories expanded)
        for a in variant.spec:
            if str(a) == "{corpus}":
                args.extend(str(p) for p in corpus_files(corpus_paths))
            else:
                args.append(str(a).format(out=out, corpus=",".join(str(p) for p in corpus_paths)))
        try:
            code = main(["tokenizer", "train", *args])
        except SystemExit as exc:  # argparse rejects bad arguments by exiting
            code = exc.code if isinstance(exc.code, int) else 2
        if code != 0 or not out.is_dir():
            raise InputError(f"variant {variant.name}: 'vpmoe tokenizer train {' '.join(args)}' failed "
                             f"(exit {code}) or did not write {out}")
        return out
    with atomic_directory(out) as tmp:  # bpe: a byte-level BPE from the tokenizers library
        train_byte_level_bpe(corpus_docs, dict(variant.spec)["vocab_size"], tmp)
    return out


def train_byte_level_bpe(texts: List[str], vocab_size: int, out: Path) -> None:
    """A byte-level BPE (``tokenizers`` library) with ``<|endoftext|>`` as end-of-document,
    saved to ``out`` as a ``PreTrainedTokenizerFast`` directory (presets, tests, benchmarks)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(out))


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def spike_count(losses: List[float], window: int = 10, factor: float = 1.2) -> int:
    """Steps whose loss exceeds ``factor`` x the median of the previous ``window`` steps."""
    spikes = 0
    for i in range(window, len(losses)):
        prev = sorted(losses[i - window : i])
        median = prev[window // 2]
        if losses[i] > factor * median:
            spikes += 1
    return spikes


def run_variant(exp: ExperimentConfig, variant: Variant, docs: List[str], tok_dir: Path, shards: Dict[str, dict],
                times: Dict[str, float], progress: bool = True) -> Dict[str, object]:
    """All stages of one variant; returns its summary row (also saved as ``summary.json``)."""
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.data.dataset import build_datasets
    from megatron_vpmoe.eval.harness import EvalOptions, run_eval
    from megatron_vpmoe.eval.report import write_results
    from megatron_vpmoe.inference.native import NativeBackend
    from megatron_vpmoe.model.params import count_parameters
    from megatron_vpmoe.tokenizers import load
    from megatron_vpmoe.training.checkpoint import latest_checkpoint, read_trainer_state
    from megatron_vpmoe.training.trainer import Trainer
    from megatron_vpmoe.utils.atomic import atomic_write_text

    vdir = exp.out / variant.name
    summary_file = vdir / "summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    vdir.mkdir(parents=True, exist_ok=True)
    times = dict(times)
    project_tok = load(tok_dir)
    tokenizer = project_tok.to_hf()
    train_chars = sum(len(d) for d in docs)
    train_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = shards["train"]["tokens_per_variant"][variant.name] - len(docs)  # without the EOD tokens

    cfg = load_config(str(exp.base_config), exp.overrides + [
        f"model.vocab_size={_round_up(len(tokenizer))}", f"run.dir={vdir / 'run'}", f"run.name={variant.name}",
        f"data.tokenizer={tok_dir.resolve()}", "data.mock=false",
        f"data.blend=[[1.0, {shard_prefix(exp.out, 'train', variant.name)}]]", "data.split=100,0,0",
        "log.progress_bar=false",
        "checkpoint.dir=null", "checkpoint.load=auto"])
    t = cfg.train
    bytes_per_token = train_bytes / max(n_tokens, 1)
    steps = max(1, math.ceil(exp.train_bytes / (t.global_batch_size * cfg.data.seq_length * bytes_per_token)))
    cfg.train.steps = steps
    cfg.train.schedule.warmup_steps = min(cfg.train.schedule.warmup_steps, steps // 4)
    if cfg.train.eval_interval:
        cfg.train.eval_interval = max(1, min(cfg.train.eval_interval, steps))
    cfg.validate()

    t0 = time.perf_counter()
    done = latest_checkpoint(cfg.checkpoint_dir)
    if done is None or read_trainer_state(done)["step"] < steps:
        # megatron-core GPT datasets over the variant's shards (the trainer's normal data path);
        # validation reads the held-out split's shards
        samples = {"train": steps * t.global_batch_size, "valid": max(1, t.eval_iters) * t.global_batch_size}
        train_set, valid_set = (
            build_datasets(replace(cfg.data, blend=[[1.0, shard_prefix(exp.out, split, variant.name)]]),
                           seed=cfg.run.seed, num_samples=(samples[split], 0, 0), eod_id=project_tok.eod_id,
                           pad_id=project_tok.pad_id, cache_dir=str(vdir / "data_cache"),
                           vocab_size=cfg.model.vocab_size)[0]
            for split in ("train", "valid"))
        trainer = Trainer(cfg, datasets=(train_set, valid_set), tokenizer=project_tok, quiet=not progress)
        code = trainer.run()
        if code != 0:
            raise InputError(f"variant {variant.name}: training stopped with exit code {code}")
        del trainer
    times["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results_file = vdir / "eval" / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
    else:
        backend = NativeBackend(str(cfg.checkpoint_dir), max_length=cfg.data.seq_length)
        options = EvalOptions(tasks=exp.eval_tasks, limit=exp.eval_limit, bpb_text=exp.bpb_text,
                              long_text=exp.long_text, context=cfg.data.seq_length, progress=False,
                              max_new_tokens=64, gsm8k_shots=2)
        results = run_eval(backend, options, model_name=variant.name)
        write_results(results, vdir / "eval")
    times["eval_s"] = time.perf_counter() - t0

    records = [json.loads(line) for line in (vdir / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_recs = [r for r in records if r.get("kind") == "train" and not r.get("skipped")]
    valid_recs = [r for r in records if r.get("kind") == "valid"]
    tokens_per_sample = cfg.data.seq_length
    curve = [{"step": r["step"], "bytes_seen": r["consumed_samples"] * tokens_per_sample * bytes_per_token,
              "loss": r["loss"], "bits_per_byte": r.get("bits_per_byte")} for r in train_recs]
    # training time across resumes: the trainer's own per-step times
    times["train_s"] = max(times["train_s"], sum(r.get("step_time_s", 0.0) for r in records if r.get("kind") == "train"))
    counts = count_parameters(cfg.model)
    tasks = results["tasks"]
    scores = {name: m.get("acc", m.get("exact_match")) for name, m in tasks.items()
              if "acc" in m or "exact_match" in m}
    long = tasks.get("long_context", {})
    summary = {
        "variant": variant.name, "reference": variant.reference, "tokenizer": str(tok_dir),
        "vocab_size": len(tokenizer), "model_vocab_size": cfg.model.vocab_size,
        "tokens_per_char": n_tokens / max(train_chars, 1), "bytes_per_token": bytes_per_token,
        "train_tokens": n_tokens, "train_bytes_budget": exp.train_bytes,
        "embedding_head_params": counts.embedding_head, "active_params": counts.active,
        "embedding_head_share_of_active": counts.embedding_head / counts.active,
        "active_non_embedding_params": counts.active - counts.embedding_head, "total_params": counts.total,
        "steps": steps, "bytes_seen": curve[-1]["bytes_seen"] if curve else 0.0,
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
        "final_train_bpb": train_recs[-1].get("bits_per_byte") if train_recs else None,
        "loss_spikes": spike_count([r["loss"] for r in train_recs]),
        "max_grad_norm": max((r["grad_norm"] for r in train_recs), default=None),
        "skipped_steps": sum(1 for r in records if r.get("kind") == "train" and r.get("skipped")),
        "valid_bpb": valid_recs[-1].get("bits_per_byte") if valid_recs else None,
        "eval_bpb": tasks.get("bpb", {}).get("bpb"), "scores": scores,
        "long_context_degradation": long.get("degradation"), "long_context": long,
        "curve": curve, "seconds": times, "wall_time_s": sum(times.values()),
    }
    atomic_write_text(summary_file, json.dumps(summary, indent=1) + "\n")
    return summary


def _docs_for(docs: List[str], max_bytes: int) -> int:
    total = 0
    for i, d in enumerate(docs):
        total += len(d.encode("utf-8"))
        if total >= max_bytes:
            return i + 1
    return len(docs)


def run_tokenizer_experiment(config: str, out: Optional[str] = None, overrides: Sequence[str] = (),
                             progress: bool = True) -> Path:
    """Run (or resume) every variant, then write the report; returns the report path."""
    from megatron_vpmoe.eval.experiment_report import write_experiment_report

    exp = load_experiment_config(config, out, overrides)
    # the same documents for every variant: the first train_bytes of the corpus for training,
    # the next valid_bytes for validation
    docs = read_corpus(exp.corpus, exp.train_bytes + exp.valid_bytes)
    split = _docs_for(docs, exp.train_bytes)
    train_docs, valid_docs = docs[:split], docs[split:]
    if not valid_docs:
        raise InputError(f"{exp.source}: the corpus has no text left for validation after train_bytes")
    # every variant's tokenizer first, then one preprocessing pass over the same documents
    documents = write_documents(exp.out, train_docs, valid_docs)
    tok_dirs: Dict[str, Path] = {}
    tok_times: Dict[str, float] = {}
    tok_docs = train_docs[: _docs_for(train_docs, exp.tokenizer_train_bytes)]
    for variant in exp.variants:
        t0 = time.perf_counter()
        tok_dirs[variant.name] = obtain_tokenizer(variant, exp.out / variant.name / "tokenizer", tok_docs, exp.corpus)
        tok_times[variant.name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shards = preprocess_documents(exp.out, documents, tok_dirs)
    preprocess_s = (time.perf_counter() - t0) / len(exp.variants)  # one shared pass, split evenly
    rows = []
    iterator = exp.variants
    if progress:
        from tqdm import tqdm

        iterator = tqdm(exp.variants, desc="variants", unit="variant")
    for variant in iterator:
        if progress:
            iterator.set_postfix_str(variant.name)  # type: ignore[union-attr]
        times = {"tokenizer_s": tok_times[variant.name], "preprocess_s": preprocess_s}
        rows.append(run_variant(exp, variant, train_docs, tok_dirs[variant.name], shards, times, progress=False))
    report = write_experiment_report(rows, exp.out)
    if progress:
        print(report.read_text())
        print(f"wrote {report}")
    return report
