"""Model backends behind the server: batched sampling and prompt scoring on token ids.

A backend wraps one model and its tokenizer and answers two batched calls, both on token ids:
``generate`` (sampled continuations with the log-prob of each sampled token) and
``score`` (log-prob of every token of each sequence given its prefix, for ``echo``).

* :class:`HFBackend` - a Hugging Face causal LM directory (``config.json`` + weights + tokenizer),
  sampled with ``transformers``' own ``generate``.
* :class:`VpmoeBackend` - this project's checkpoints, through ``megatron_vpmoe.model``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_vpmoe.serve.chat_format import HARMONY_SPECIALS, HARMONY_STOPS, render_harmony_prompt
from megatron_vpmoe.utils.errors import InputError


@dataclass
class SampleParams:
    """Sampling parameters shared by every row of one backend call (the batch key)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_ids: tuple = ()

    def key(self) -> tuple:
        return (self.max_new_tokens, self.temperature, self.top_p, self.seed, self.stop_ids)


class Cancelled(Exception):
    """Every request of a backend call went away; the call stopped at a forward step."""


@contextlib.contextmanager
def stop_when(model, cancelled: Optional[threading.Event]):
    """Stop ``model``'s work (raise :class:`Cancelled` at its next forward call) once
    ``cancelled`` is set; sampling loops call the model once per token, so a generation ends
    within one step of its last client leaving."""
    if cancelled is None:
        yield
        return

    def check(*_):
        if cancelled.is_set():
            raise Cancelled("every request of this batch was cancelled")

    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Sampled:
    tokens: list  # generated ids, without the stop token
    logprobs: list  # log-prob of each generated id under the model (untempered)
    finish_reason: str  # "stop" | "length"


class Backend:
    """Common tokenizer-side behaviour; subclasses implement ``_generate`` and ``score``."""

    model_id: str
    eos_ids: tuple = ()
    vocab_size: Optional[int] = None  # token ids in requests must be below it

    # tokenizer ------------------------------------------------------------------------------
    def encode(self, text: str) -> list:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list, list]:
        """Ids and each token's start offset in ``text``."""
        ids = self.encode(text)
        return ids, self.offsets(ids)

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def offsets(self, ids: Sequence[int]) -> list:
        """Character offset where each token starts in ``decode(ids)``."""
        return [len(self.decode(ids[:i])) for i in range(len(ids))]

    def max_token_chars(self) -> int:
        """An upper bound on the characters one token stands for: a text of more than
        ``n * max_token_chars()`` characters has more than ``n`` tokens, known without encoding it."""
        raise NotImplementedError

    @property
    def is_harmony(self) -> bool:
        return all(self.token_id(t) is not None for t in HARMONY_SPECIALS)

    def chat_prompt(self, messages: list) -> str:
        if self.is_harmony:
            return render_harmony_prompt(messages)
        return self._chat_template(messages)

    def _chat_template(self, messages: list) -> str:
        raise InputError(f"model {self.model_id} has no chat template and is not a Harmony model")

    def chat_stop_ids(self) -> tuple:
        if self.is_harmony:
            return tuple(i for i in (self.token_id(t) for t in HARMONY_STOPS) if i is not None)
        return self.eos_ids

    # model ----------------------------------------------------------------------------------
    def generate(self, prompts: list, params: SampleParams, cancelled: Optional[threading.Event] = None) -> list:
        """One batched call; ``prompts`` are token-id lists; returns one :class:`Sampled` each.
        Raises :class:`Cancelled` soon after ``cancelled`` is set."""
        raise NotImplementedError

    def score(self, sequences: list, cancelled: Optional[threading.Event] = None) -> list:
        """Per-token log-probs of each sequence given its prefix (first entry None)."""
        raise NotImplementedError


def truncate_at_stop(tokens, logprobs, stop_ids, max_new_tokens) -> Sampled:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return Sampled(list(tokens[:i]), list(logprobs[:i]), "stop")
    reason = "length" if len(tokens) >= max_new_tokens else "stop"
    return Sampled(list(tokens), list(logprobs), reason)


class HFTokenizerBackend(Backend):
    """The tokenizer side for backends whose ``self.tokenizer`` is a ``transformers`` tokenizer."""

    tokenizer = None

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_with_offsets(self, text: str):
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [s for s, _ in enc["offset_mapping"]]
        return super().encode_with_offsets(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def max_token_chars(self) -> int:
        if getattr(self, "_max_token_chars", None) is None:
            # vocabulary strings spell a token with at least one character per decoded
            # character (byte-level BPE: one per byte; SentencePiece: one per piece character)
            vocab = self.tokenizer.get_vocab()
            self._max_token_chars = max([len(t) for t in vocab] + [1])
        return self._max_token_chars

    def token_id(self, token: str):
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.tokenizer.unk_token_id else tid

    def _chat_template(self, messages):
        if not getattr(self.tokenizer, "chat_template", None):
            return super()._chat_template(messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class HFBackend(HFTokenizerBackend):
    """A local Hugging Face causal LM (``AutoModelForCausalLM`` + ``AutoTokenizer``)."""

    def __init__(self, path: str, model_id: Optional[str] = None, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)
        self.model_id = model_id or self.path.name
        from safetensors import SafetensorError

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=getattr(torch, dtype))
        except (OSError, ValueError, SafetensorError) as err:  # truncated or fake weights too
            raise InputError(f"{path}: not a loadable Hugging Face causal LM directory "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        self.model.eval()
        self.vocab_size = self.model.config.vocab_size
        eos = self.tokenizer.eos_token_id
        self.eos_ids = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (
            self.eos_ids[0] if self.eos_ids else 0)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None)
        self._lock = threading.Lock()  # torch's global RNG is seeded per call

    def _check_length(self, n: int) -> None:
        if self.max_positions and n > self.max_positions:
            raise InputError(f"sequence of {n} tokens exceeds the model's {self.max_positions} positions")

    def generate(self, prompts, params: SampleParams, cancelled=None):
        import torch

        width = max(len(p) for p in prompts)
        self._check_length(width + params.max_new_tokens)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        greedy = params.temperature <= 0
        stop = list(params.stop_ids) or None
        with self._lock, torch.no_grad(), stop_when(self.model, cancelled):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens,
                do_sample=not greedy, temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p, top_k=None, eos_token_id=stop,
                pad_token_id=self.pad_id, output_logits=True, return_dict_in_generate=True,
            )
        new = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).float()  # (batch, new, vocab), untempered
        lp = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        results = []
        for i in range(len(prompts)):
            results.append(truncate_at_stop(new[i].tolist(), lp[i].tolist(),
                                             set(params.stop_ids), params.max_new_tokens))
        return results

    def score(self, sequences, cancelled=None):
        import torch

        width = max(len(s) for s in sequences)
        self._check_length(width)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):  # right padding: positions need no shifting
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        with torch.no_grad(), stop_when(self.model, cancelled):
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return [[None] + lp[i, : len(s) - 1].tolist() for i, s in enumerate(sequences)]


def load_tokenizer_dir(directory: str):
    """A tokenizer directory as a ``transformers`` fast tokenizer: a ``vpmoe tokenizer``
    directory (``vpmoe_tokenizer.json``) through its loader's ``to_hf()``, else a plain Hugging
    Face directory (``tokenizer.json``)."""
    path = Path(directory)
    if not path.is_dir():
        raise InputError(f"{directory}: tokenizer directory not found")
    if (path / "vpmoe_tokenizer.json").is_file():
        from megatron_vpmoe.tokenizers import load

        return load(str(path)).to_hf()
    if not (path / "tokenizer.json").is_file():
        raise InputError(f"{directory}: neither vpmoe_tokenizer.json nor tokenizer.json")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def load_backend(path: str, model_id: Optional[str] = None, tokenizer: Optional[str] = None) -> Backend:
    """A Hugging Face directory (has ``config.json``) or a VPMoE checkpoint (+ its tokenizer)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such checkpoint or model directory")
    if (p / "config.json").is_file():
        return HFBackend(str(p), model_id)
    from megatron_vpmoe.serve.vpmoe_backend import VpmoeBackend  # needs the model package

    return VpmoeBackend(str(p), model_id, tokenizer)


def set_threads(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
