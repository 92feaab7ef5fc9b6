"""Language-model backends the evaluation tasks run against.

A backend wraps one model and its tokenizer behind three operations every task needs:
log-likelihood of continuations, greedy generation, and per-token NLL of token sequences.
Subclasses supply only the primitives (``encode``, ``decode``, ``forward_logits``); the
scoring, batching, truncation and greedy decoding live once, in :class:`LMBackend`.

Implementations: :class:`HFBackend` (a local Hugging Face causal-LM directory, including
this project's converted checkpoints, loaded with this package's model code) and ``NativeBackend`` in
``native.py`` (this project's ``VpmoeModel`` with its tokenizer). :func:`open_backend` picks
one for a path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_vpmoe.utils.errors import InputError


class LMBackend:
    """Base class: batched scoring and greedy generation on top of ``forward_logits``."""

    name: str = "backend"
    max_length: int = 2048  # longest input the model is asked to read
    batch_size: int = 8
    eos_token_ids: Tuple[int, ...] = ()

    # ---- primitives a subclass provides -------------------------------------------------
    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def prefix_token_id(self) -> int:
        """The token put before a document scored from its first token (BOS / end-of-document)."""
        raise NotImplementedError

    def forward_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, S]`` right-padded (``lengths [B]`` real tokens) -> logits ``[B, S, V]``."""
        raise NotImplementedError

    # ---- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """For each sequence, ``log p(seq[j] | seq[:j])`` and whether ``seq[j]`` is the argmax,
        for ``j`` in ``[start, len(seq))``. ``start >= 1``; sequences are at most
        ``max_length + 1`` tokens (the last one is only a target). Batched, longest first."""
        if len(sequences) != len(starts):
            raise ValueError("sequences and starts differ in length")
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(sequences)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            inputs = [list(sequences[i][:-1]) for i in idx]
            lengths = torch.tensor([len(x) for x in inputs])
            if int(lengths.min()) < 1 or int(lengths.max()) > self.max_length:
                raise ValueError(f"input lengths must be in [1, {self.max_length}], got {lengths.tolist()}")
            width = int(lengths.max())
            batch = torch.zeros(len(idx), width, dtype=torch.long)
            for row, ids in enumerate(inputs):
                batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logits = self.forward_logits(batch, lengths)
            for row, i in enumerate(idx):
                seq, start = sequences[i], starts[i]
                if not 1 <= start <= len(seq):
                    raise ValueError(f"start {start} outside [1, {len(seq)}]")
                pos = slice(start - 1, len(seq) - 1)
                row_logits = logits[row, pos].float()
                targets = torch.tensor(seq[start:], dtype=torch.long)
                logprobs = row_logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(
                    row_logits, dim=-1
                )
                greedy = row_logits.argmax(-1) == targets
                out[i] = (logprobs, greedy)
        return out  # type: ignore[return-value]

    def split_request(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Token ids of ``context`` and of ``continuation`` as it is tokenized after it.

        Trailing spaces of the context move to the continuation (so " Paris" is one token),
        and the continuation's ids are read off the joint encoding, so the split matches what
        the model sees. An empty context becomes the prefix (document-start) token.
        """
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        context = stripped
        whole = self.encode(context + continuation)
        ctx = self.encode(context) if context else []
        if whole[: len(ctx)] != ctx:  # the boundary merged into one token: encode separately
            whole = ctx + self.encode(continuation)
        cont = whole[len(ctx):]
        if not cont:
            raise InputError(f"continuation {continuation!r} encodes to no tokens")
        if not ctx:
            ctx = [self.prefix_token_id]
        return ctx, cont

    def loglikelihood(self, requests: Sequence[Tuple[str, str]]) -> List[Tuple[float, bool]]:
        """``(sum log p(continuation | context), continuation is the greedy completion)`` per request."""
        seqs, starts = [], []
        for context, continuation in requests:
            ctx, cont = self.split_request(context, continuation)
            seq = (ctx + cont)[-(self.max_length + 1):]  # left-truncate the context
            seqs.append(seq)
            # a continuation longer than the window is scored on its last max_length tokens
            starts.append(max(1, len(seq) - len(cont)))
        return [(float(lp.sum()), bool(g.all())) for lp, g in self.score(seqs, starts)]

    def token_nlls(self, ids: Sequence[int], window: Optional[int] = None) -> torch.Tensor:
        """Per-token NLL (nats) of every token of a document given all before it, read in
        non-overlapping windows of ``window`` (default ``max_length``) tokens, the first one
        after the prefix token."""
        window = window or self.max_length
        seq = [self.prefix_token_id] + list(ids)
        pieces, starts = [], []
        for begin in range(1, len(seq), window):
            pieces.append(seq[begin - 1 : begin + window])
            starts.append(1)
        scored = self.score(pieces, starts)
        return -torch.cat([lp for lp, _ in scored]) if scored else torch.zeros(0)

    # ---- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> List[List[int]]:
        """Greedy continuation of each prompt (no cache; backends with a KV cache override)."""
        outs: List[List[int]] = []
        for b in range(0, len(prompts), self.batch_size):
            rows = [list(p) for p in prompts[b : b + self.batch_size]]
            new: List[List[int]] = [[] for _ in rows]
            done = [False] * len(rows)
            for _ in range(max_new_tokens):
                live = [i for i, d in enumerate(done) if not d]
                if not live:
                    break
                seqs = [(rows[i] + new[i])[-self.max_length:] for i in live]
                lengths = torch.tensor([len(s) for s in seqs])
                batch = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
                for r, s in enumerate(seqs):
                    batch[r, : len(s)] = torch.tensor(s, dtype=torch.long)
                logits = self.forward_logits(batch, lengths)
                nxt = logits[torch.arange(len(seqs)), lengths - 1].argmax(-1).tolist()
                for r, i in enumerate(live):
                    new[i].append(nxt[r])
                    if nxt[r] in self.eos_token_ids or self._should_stop(new[i]):
                        done[i] = True
            outs.extend(new)
        return outs

    _stop_strings: Tuple[str, ...] = ()

    def _should_stop(self, new_ids: List[int]) -> bool:
        if not self._stop_strings:
            return False
        tail = self.decode(new_ids[-64:])
        return any(s in tail for s in self._stop_strings)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> List[str]:
        """Greedy completions of text prompts, cut at the first stop string."""
        self._stop_strings = tuple(stop)
        try:
            ids = self.generate_ids([self.encode(p) or [self.prefix_token_id] for p in prompts], max_new_tokens)
        finally:
            self._stop_strings = ()
        texts = []
        for seq in ids:
            seq = [t for t in seq if t not in self.eos_token_ids]
            text = self.decode(seq)
            cut = min((text.find(s) for s in stop if s in text), default=len(text))
            texts.append(text[:cut])
        return texts

    def describe(self) -> dict:
        return {"backend": self.name, "max_length": self.max_length}


class TokenizerBackend(LMBackend):
    """Text handling through a ``transformers`` tokenizer in ``self.tokenizer``."""

    tokenizer = None
    path: Optional[str] = None

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.bos_token_id, tok.eos_token_id):
            if cand is not None:
                return int(cand)
        raise InputError(f"{self.path}: the tokenizer has neither a BOS nor an EOS token to start documents")


def _json_object(file: Path) -> dict:
    """``file``'s JSON object, or {} when there is no such file."""
    import json

    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{file}: expected a JSON object")
    return data


class HFBackend(TokenizerBackend):
    """A Hugging Face causal LM from a local directory (``AutoModelForCausalLM``).

    Code shipped in the directory (``auto_map``) runs only with ``trust_remote_code``. A VPMoE
    directory written by ``vpmoe convert to-hf`` loads without it: the model classes come from
    this package (``convert/hf_template``), never from the directory's copies."""

    name = "hf"

    def __init__(self, path: str, *, batch_size: int = 8, max_length: Optional[int] = None,
                 device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = str(path)
        self.device = torch.device(device)
        config = _json_object(Path(path) / "config.json")
        ours = config.get("model_type") == "vpmoe" and not trust_remote_code
        if not trust_remote_code:  # auto_map names classes whose code the directory ships
            needs = [f"config.json auto_map {sorted(config['auto_map'])}"] if config.get("auto_map") and not ours else []
            tok_map = _json_object(Path(path) / "tokenizer_config.json").get("auto_map")
            if tok_map:
                needs.append(f"tokenizer_config.json auto_map {sorted(tok_map)}")
            if needs:
                raise InputError(f"{path}: loading it runs Python code shipped in the directory "
                                 f"({'; '.join(needs)}); pass --trust-remote-code only if you trust its source")
        from safetensors import SafetensorError

        if ours:
            from megatron_vpmoe.convert.hf_template.modeling_vpmoe import VpmoeForCausalLM as model_class
        else:
            model_class = AutoModelForCausalLM
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code,
                                                           local_files_only=True)
            self.model = model_class.from_pretrained(
                self.path, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype), local_files_only=True
            ).to(self.device).eval()
        except (OSError, ValueError, KeyError, SafetensorError) as err:  # missing/corrupt files, unknown model type
            reason = " ".join(str(err).split())
            raise InputError(f"{path}: not a loadable Hugging Face causal LM directory ({type(err).__name__}: "
                             f"{reason[:300]})") from None
        cfg = self.model.config
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", None)
                              or getattr(cfg, "n_positions", None) or 2048)
        self.batch_size = batch_size
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())

    def forward_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(input_ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
        return self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits.cpu()

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> List[List[int]]:
        outs = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id
        for b in range(0, len(prompts), self.batch_size):
            rows = [list(p)[-max(1, self.max_length - max_new_tokens):] for p in prompts[b : b + self.batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):  # left padding for generation
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            if self._stop_strings:
                kwargs.update(stop_strings=list(self._stop_strings), tokenizer=self.tokenizer)
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
            outs.extend(row[width:].tolist() for row in gen.cpu())
        return outs

    def describe(self) -> dict:
        return {"backend": self.name, "path": self.path, "max_length": self.max_length,
                "model_type": getattr(self.model.config, "model_type", None)}


def is_hf_directory(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (
        any(p.glob("*.safetensors")) or any(p.glob("*.bin")) or (p / "model.safetensors.index.json").is_file()
    )


def open_backend(path: str, *, batch_size: int = 8, max_length: Optional[int] = None,
                 device: str = "cpu", trust_remote_code: bool = False) -> LMBackend:
    """A backend for ``path``: a Hugging Face model directory or a native checkpoint
    (``trust_remote_code``: let a Hugging Face directory run the Python code it ships)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such checkpoint or model directory")
    if is_hf_directory(p):
        return HFBackend(path, batch_size=batch_size, max_length=max_length, device=device,
                         trust_remote_code=trust_remote_code)
    from megatron_vpmoe.eval.native import NativeBackend

    return NativeBackend(path, batch_size=batch_size, max_length=max_length, device=device)


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """Summed NLL in nats over a text, per UTF-8 byte of that text, in bits."""
    return nll_nats / math.log(2) / max(num_bytes, 1)
