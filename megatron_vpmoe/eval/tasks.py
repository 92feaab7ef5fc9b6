"""Evaluation tasks: bits per byte, GSM8K, multiple choice by log-likelihood, long context.

Each task reads its data from a local file (``eval/`` of ``utils.paths.data_dir()`` by default), runs
against a :class:`~megatron_vpmoe.inference.Backend` (through :mod:`megatron_vpmoe.eval.requests`) and returns a flat dict of
metrics plus ``n`` (items scored). Bad data raises :class:`InputError` naming file and line.

Task names (``--tasks``): ``bpb``, ``gsm8k``, ``mmlu_stem``, ``lambada``, ``piqa``, ``copa``,
``openbookqa``, ``commonsenseqa``, ``winogrande``, ``wsc``, ``long_context``; groups ``mc``
(every multiple-choice task) and ``all``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_vpmoe.eval.requests import (
    document_nll, document_windows, greedy_completions, loglikelihood, split_request)
from megatron_vpmoe.inference.backend import Backend
from megatron_vpmoe.training.loss import bits_per_byte
from megatron_vpmoe.utils.answers import predicted_answer, reference_answer
from megatron_vpmoe.utils.errors import InputError
from megatron_vpmoe.utils.jsonl import read_jsonl
from megatron_vpmoe.utils.paths import data_dir
from megatron_vpmoe.utils.progress import is_terminal, terminal_bar

# the data folder's eval/ (VPMOE_DATA, ../shared/data or the embedded default), resolved at import
DEFAULT_EVAL_DIR = data_dir() / "eval"
DEFAULT_FEWSHOT_FILE = DEFAULT_EVAL_DIR.parent / "kd" / "gsm8k_train.jsonl"


def _field(rec: dict, key: str, kind, path: Path, lineno: int):
    if key not in rec:
        raise InputError(f"{path}:{lineno}: missing key {key!r}")
    value = rec[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise InputError(f"{path}:{lineno}: key {key!r} must be {getattr(kind, '__name__', kind)}")
    return value


# ---- multiple choice -------------------------------------------------------------------

@dataclass
class ChoiceItem:
    """One multiple-choice item: score ``contexts[i] + continuations[i]`` for each option."""

    contexts: List[str]
    continuations: List[str]
    gold: int


def _join(context: str, continuation: str, delimiter: str = " ") -> tuple[str, str]:
    if not context or context[-1].isspace() or (continuation and continuation[0].isspace()):
        return context, continuation
    return context, delimiter + continuation


def parse_choice_record(rec: dict, path: Path, lineno: int) -> ChoiceItem:
    """The three MosaicML gauntlet layouts and MMLU's ``question/choices/answer``."""
    if "query" in rec:  # query / choices / gold
        query = _field(rec, "query", str, path, lineno)
        choices = _field(rec, "choices", list, path, lineno)
        gold = _field(rec, "gold", int, path, lineno)
        pairs = [_join(query, str(c)) for c in choices]
    elif "context_options" in rec:  # partial scoring: the same continuation after each option
        options = _field(rec, "context_options", list, path, lineno)
        cont = _field(rec, "continuation", str, path, lineno)
        gold = _field(rec, "gold", int, path, lineno)
        pairs = [_join(str(o), cont) for o in options]
    elif "question" in rec and "choices" in rec:  # MMLU
        question = _field(rec, "question", str, path, lineno)
        choices = _field(rec, "choices", list, path, lineno)
        gold = _field(rec, "answer", int, path, lineno)
        letters = "ABCDEFGHIJ"[: len(choices)]
        prompt = question.strip() + "\n" + "".join(f"{l}. {c}\n" for l, c in zip(letters, choices)) + "Answer:"
        pairs = [(prompt, f" {l}") for l in letters]
    else:
        raise InputError(f"{path}:{lineno}: unknown layout (expected query/choices/gold, "
                         "context_options/continuation/gold or question/choices/answer)")
    if len(pairs) < 2 or not 0 <= gold < len(pairs):
        raise InputError(f"{path}:{lineno}: needs >= 2 choices and a gold index among them")
    return ChoiceItem([p[0] for p in pairs], [p[1] for p in pairs], gold)


def score_choices(backend: Backend, items: Sequence[ChoiceItem]) -> Dict[str, float]:
    """Accuracy by summed log-likelihood (``acc``) and by log-likelihood per UTF-8 byte of the
    option (``acc_norm``). A tie at the top earns ``1/ties`` (the expectation under random
    tie-breaking), so a model with no preference scores chance exactly."""
    requests = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    scores = loglikelihood(backend, requests)
    acc = acc_norm = chance = 0.0
    pos = 0
    for it in items:
        n = len(it.contexts)
        ll = [scores[pos + i][0] for i in range(n)]
        per_byte = [l / max(len(k.encode("utf-8")), 1) for l, k in zip(ll, it.continuations)]
        pos += n
        acc += _tie_credit(ll, it.gold)
        acc_norm += _tie_credit(per_byte, it.gold)
        chance += 1.0 / n
    n_items = max(len(items), 1)
    return {"acc": acc / n_items, "acc_norm": acc_norm / n_items, "chance": chance / n_items, "n": len(items)}


def _tie_credit(values: List[float], gold: int, tol: float = 1e-6) -> float:
    best = max(values)
    top = [i for i, v in enumerate(values) if v >= best - tol * max(1.0, abs(best))]
    return 1.0 / len(top) if gold in top else 0.0


def score_completion(backend: Backend, path: Path, limit: Optional[int]) -> Dict[str, float]:
    """LAMBADA-style: the continuation must be the model's greedy completion (``acc``);
    also its perplexity per token."""
    reqs = []
    for lineno, rec in read_jsonl(path, limit):
        ctx = _field(rec, "context", str, path, lineno)
        cont = _field(rec, "continuation", str, path, lineno)
        reqs.append(_join(ctx, cont))
    results = loglikelihood(backend, reqs)
    ntok = sum(len(split_request(backend, c, k)[1]) for c, k in reqs)
    nll = -sum(r[0] for r in results)
    return {"acc": sum(r[1] for r in results) / max(len(reqs), 1),
            "ppl": math.exp(nll / max(ntok, 1)), "chance": 0.0, "n": len(reqs)}


MC_FILES = {
    "mmlu_stem": "mmlu_stem.jsonl",
    "piqa": "mc/piqa.jsonl",
    "copa": "mc/copa.jsonl",
    "openbookqa": "mc/openbook_qa.jsonl",
    "commonsenseqa": "mc/commonsense_qa.jsonl",
    "winogrande": "mc/winogrande.jsonl",
    "wsc": "mc/winograd_wsc.jsonl",
}
COMPLETION_FILES = {"lambada": "mc/lambada_openai.jsonl"}


def run_multiple_choice(backend: Backend, path: Path, limit: Optional[int]) -> Dict[str, float]:
    items = [parse_choice_record(rec, path, lineno) for lineno, rec in read_jsonl(path, limit)]
    return score_choices(backend, items)


# ---- GSM8K -----------------------------------------------------------------------------

_CALC = re.compile(r"<<[^>]*>>")
def gsm8k_fewshot_prefix(path: Path, shots: int) -> str:
    parts = []
    for lineno, rec in read_jsonl(path, shots):
        q = _field(rec, "question", str, path, lineno)
        a = _CALC.sub("", _field(rec, "answer", str, path, lineno))
        parts.append(f"Question: {q}\nAnswer: {a}\n\n")
    return "".join(parts)


GSM8K_STOP = ("\n\n", "Question:")


def run_gsm8k(backend: Backend, path: Path, limit: Optional[int], *, shots: int = 5,
              fewshot_file: Path = DEFAULT_FEWSHOT_FILE, max_new_tokens: int = 256) -> Dict[str, float]:
    prefix = gsm8k_fewshot_prefix(fewshot_file, shots) if shots else ""
    prompts, golds = [], []
    for lineno, rec in read_jsonl(path, limit):
        q = _field(rec, "question", str, path, lineno)
        gold = reference_answer(_field(rec, "answer", str, path, lineno))
        if gold is None:
            raise InputError(f"{path}:{lineno}: the answer has no final '#### N' number")
        prompts.append(f"{prefix}Question: {q}\nAnswer:")
        golds.append(gold)
    completions = greedy_completions(backend, prompts, max_new_tokens, stop=GSM8K_STOP)
    correct = sum(predicted_answer(c) == g for c, g in zip(completions, golds))
    return {"exact_match": correct / max(len(golds), 1), "chance": 0.0, "n": len(golds),
            "shots": shots, "examples": [{"prompt_tail": p[-200:], "completion": c, "gold": g}
                                        for p, c, g in list(zip(prompts, completions, golds))[:3]]}


# ---- text: bits per byte and long-context degradation -----------------------------------

def read_documents(path: Path, limit: Optional[int]) -> List[str]:
    """Documents of a text source: a ``.txt`` file (one document) or directory of them, or a
    JSONL file with ``text`` (or LAMBADA's ``context`` + ``continuation``) per line."""
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise InputError(f"{path}: no .txt files")
        docs = [f.read_text(encoding="utf-8") for f in files[: limit or None]]
    elif path.suffix == ".jsonl":
        docs = []
        for lineno, rec in read_jsonl(path, limit):
            if "text" in rec:
                docs.append(_field(rec, "text", str, path, lineno))
            elif "context" in rec:
                ctx, cont = _join(_field(rec, "context", str, path, lineno),
                                  _field(rec, "continuation", str, path, lineno))
                docs.append(ctx + cont)
            else:
                raise InputError(f"{path}:{lineno}: expected a 'text' or 'context'/'continuation' key")
    elif path.is_file():
        docs = [path.read_text(encoding="utf-8")]
    else:
        raise InputError(f"{path}: no such file or directory")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(f"{path}: no non-empty documents")
    return docs


def run_bits_per_byte(backend: Backend, path: Path, limit: Optional[int], *, progress: bool = True) -> Dict[str, float]:
    """Summed token NLL (nats) / ln 2 / UTF-8 bytes, over whole documents (every token scored,
    the first after the document-start token, in non-overlapping ``max_length`` windows:
    :func:`~megatron_vpmoe.eval.requests.document_windows`): comparable across tokenizers.
    A progress bar (windows) goes to stderr on a terminal, unless the caller follows the backend's
    ``on_scored`` hook (``vpmoe eval``'s per-task progress)."""
    docs = read_documents(path, limit)
    encoded = [backend.encode(doc) for doc in docs]
    windows = [document_windows(backend, ids) for ids in encoded]
    bar = None
    if progress and backend.on_scored is None and is_terminal():
        bar = terminal_bar(total=sum(map(len, windows)), desc="bpb", unit="window")
    try:
        nll = math.fsum(document_nll(backend, w, progress=bar.update if bar is not None else None) for w in windows)
    finally:
        if bar is not None:
            bar.close()
    tokens = sum(map(len, encoded))
    nbytes = sum(len(doc.encode("utf-8")) for doc in docs)
    return {"bpb": bits_per_byte(nll, nbytes), "nll_nats": nll, "tokens": tokens, "bytes": nbytes,
            "bytes_per_token": nbytes / max(tokens, 1), "n": len(docs)}


def run_long_context(backend: Backend, path: Path, limit: Optional[int], *, context: int,
                     factor: int = 4, buckets: int = 8) -> Dict[str, object]:
    """Mean loss per position bucket over sequences of ``factor x context`` tokens, read in one
    window (so positions beyond the training context really see that far back)."""
    length = factor * context
    if backend.max_length < length:
        backend.max_length = length  # the model is asked to read past its training context on purpose
    docs = read_documents(path, None)
    stream: List[int] = []
    wanted = None if limit is None else limit * length
    for doc in docs:
        stream += backend.encode(doc + "\n\n")
        if wanted is not None and len(stream) >= wanted:
            break
    nseq = len(stream) // length
    if limit is not None:
        nseq = min(nseq, limit)
    if nseq < 1:
        raise InputError(f"{path}: {len(stream)} tokens, fewer than one sequence of {length}")
    seqs = [[backend.prefix_token_id] + stream[i * length:(i + 1) * length] for i in range(nseq)]
    nlls = torch.stack([-lp for lp, _ in backend.score(seqs, [1] * nseq)])  # [n, length]
    edges = [round(i * length / buckets) for i in range(buckets + 1)]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        rows.append({"start": lo, "end": hi, "loss": float(nlls[:, lo:hi].mean())})
    inside = float(nlls[:, :context].mean())
    beyond = float(nlls[:, context:].mean())
    return {"context": context, "length": length, "buckets": rows, "loss_in_context": inside,
            "loss_beyond_context": beyond, "degradation": beyond - inside, "n": nseq}


# ---- registry --------------------------------------------------------------------------

MC_TASKS = list(MC_FILES) + list(COMPLETION_FILES)
ALL_TASKS = ["bpb", "gsm8k", *MC_TASKS, "long_context"]


def resolve_tasks(spec: str) -> List[str]:
    names: List[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        expand = ALL_TASKS if part == "all" else MC_TASKS if part == "mc" else [part]
        for name in expand:
            if name not in ALL_TASKS:
                raise InputError(f"unknown task {name!r} (known: {', '.join(ALL_TASKS)}, mc, all)")
            if name not in names:
                names.append(name)
    if not names:
        raise InputError("no tasks given")
    return names


def task_data_file(name: str, eval_dir: Path) -> Optional[Path]:
    """The file in ``eval_dir`` task ``name`` reads by default (None: its text is given, or defaults to LAMBADA)."""
    if name in MC_FILES:
        return eval_dir / MC_FILES[name]
    if name in COMPLETION_FILES:
        return eval_dir / COMPLETION_FILES[name]
    if name == "gsm8k":
        return eval_dir / "gsm8k_test.jsonl"
    return None


def task_runner(name: str, *, eval_dir: Path, limit: Optional[int], bpb_text: Optional[Path],
                long_text: Optional[Path], context: int, gsm8k_shots: int,
                max_new_tokens: int) -> Callable[[Backend], Dict[str, object]]:
    """The function that runs task ``name`` on a backend."""
    if name in MC_FILES:
        return lambda b: run_multiple_choice(b, eval_dir / MC_FILES[name], limit)
    if name in COMPLETION_FILES:
        return lambda b: score_completion(b, eval_dir / COMPLETION_FILES[name], limit)
    if name == "gsm8k":
        return lambda b: run_gsm8k(b, eval_dir / "gsm8k_test.jsonl", limit, shots=gsm8k_shots,
                                   fewshot_file=eval_dir.parent / "kd" / "gsm8k_train.jsonl",
                                   max_new_tokens=max_new_tokens)
    if name == "bpb":
        return lambda b: run_bits_per_byte(b, bpb_text or eval_dir / COMPLETION_FILES["lambada"], limit)
    if name == "long_context":
        return lambda b: run_long_context(b, long_text or eval_dir / COMPLETION_FILES["lambada"], limit,
                                          context=context)
    raise InputError(f"unknown task {name!r}")
