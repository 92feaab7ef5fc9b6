"""Documents -> token ids (and Harmony loss roles) for every tokenizer variant.

A field holding a list of chat messages, or text that starts with ``<|start|>`` (Harmony
rendered), is segmented by :mod:`megatron_vpmoe.data.chat`: text pieces are encoded with the
variant's tokenizer (batched), each Harmony special becomes its single id, and every token
gets the role of its segment. Plain text is encoded as it is and has no roles. ``append_eod``
adds the tokenizer's end-of-document id (role 0 in chat documents: the model is not taught to
predict EOD after an assistant turn that already ends in ``<|return|>``; plain text: EOD is
an ordinary target as in Megatron).

One encoder is built in the parent from the tokenizer directories (each HF-backed variant's
gigatoken engine is checked there, :mod:`megatron_vpmoe.tokenizers.fast`); forked worker
processes (:mod:`preprocess`) inherit it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from megatron_vpmoe.data.chat import ROLE_NONE, Segment, is_harmony_text, render_conversation, segment_harmony
from megatron_vpmoe.data.sources import Document, Skipped
from megatron_vpmoe.tokenizers.specials import HARMONY_TOKENS
from megatron_vpmoe.utils.errors import InputError



@dataclass
class EncodedDocument:
    """One document's ids per (variant, key); ``roles`` is None for plain text."""

    where: str
    nbytes: int
    ids: Dict[Tuple[str, str], List[int]] = field(default_factory=dict)
    roles: Dict[Tuple[str, str], Optional[List[int]]] = field(default_factory=dict)
    # split sentences: the lengths of the document's non-empty sentences (EOD counted in the last)
    sentences: Dict[Tuple[str, str], List[int]] = field(default_factory=dict)


class DocumentEncoder:
    def __init__(self, tokenizer_dirs: Dict[str, str], json_keys: Sequence[str], append_eod: bool,
                 keep_empty: bool = False, split_sentences: Optional[str] = None):
        from megatron_vpmoe.tokenizers import load

        # split_sentences: NLTK's punkt model of that language cuts plain text into sentences,
        # each a sequence of the document (Megatron-LM's --split-sentences); no chat records then
        self.splitter = sentence_splitter(split_sentences) if split_sentences else None
        self.tokenizers = {name: load(path) for name, path in tokenizer_dirs.items()}
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.keep_empty = keep_empty  # Megatron-LM's rule: an empty document is kept, without EOD
        self._special_ids = {}
        self.engines = {}  # variant -> "gigatoken" or why the HF tokenizers encoder is used
        for name, tok in self.tokenizers.items():
            if hasattr(tok, "fast_engine"):
                engine, reason = tok.fast_engine()
                self.engines[name] = "gigatoken" if engine is not None else f"tokenizers ({reason})"
            else:  # tiktoken or sentencepiece: their own library
                self.engines[name] = f"{getattr(tok, 'library', 'tokenizers')} (kind {tok.kind})"
            ids = {}
            for special in HARMONY_TOKENS:
                try:
                    ids[special] = tok.token_to_id(special)
                except KeyError:
                    pass
            self._special_ids[name] = ids

    def encode_batch(self, items: Sequence[Union[Document, Skipped]]) -> List[Union[EncodedDocument, Skipped]]:
        """Encode a chunk of records; a record whose chat structure is invalid becomes a Skipped."""
        out: List[Union[EncodedDocument, Skipped]] = []
        plain: Dict[str, List[Tuple[int, str]]] = {k: [] for k in self.json_keys}
        chats: List[Tuple[int, str, List[Segment]]] = []
        for i, item in enumerate(items):
            if isinstance(item, Skipped):
                out.append(item)
                continue
            out.append(EncodedDocument(item.where, item.nbytes))
            try:
                for key in self.json_keys:
                    value = item.fields[key]
                    if self.splitter is not None:
                        if not isinstance(value, str):
                            raise InputError(f"{item.where}: {key}: a list, not text (--split-sentences "
                                             f"takes text)")
                        plain[key].append((i, value))
                    elif isinstance(value, list):
                        text = render_conversation(value, f"{item.where}: {key}")
                        chats.append((i, key, segment_harmony(text, f"{item.where}: {key}")))
                    elif is_harmony_text(value):
                        chats.append((i, key, segment_harmony(value, f"{item.where}: {key}")))
                    else:
                        plain[key].append((i, value))
            except InputError as err:
                out[i] = Skipped(item.where, f"bad_chat ({str(err).split(': ', 2)[-1]})", item.nbytes)
        for name, tok in self.tokenizers.items():
            for key, docs in plain.items():
                docs = [(i, t) for i, t in docs if isinstance(out[i], EncodedDocument)]
                if self.splitter is not None:
                    self._encode_sentences(name, key, tok, docs, out)
                    continue
                for (i, _), ids in zip(docs, tok.encode_batch([t for _, t in docs]) if docs else []):
                    if self.append_eod and (ids or not self.keep_empty):
                        ids.append(tok.eod_id)
                    out[i].ids[(name, key)] = ids
                    out[i].roles[(name, key)] = None
            self._encode_chats(name, tok, [(i, k, s) for i, k, s in chats if isinstance(out[i], EncodedDocument)],
                               out)
        for i, doc in enumerate(out):  # a document that encodes to nothing is skipped (unless keep_empty)
            if not self.keep_empty and isinstance(doc, EncodedDocument) and any(not ids for ids in doc.ids.values()):
                out[i] = Skipped(doc.where, "empty", doc.nbytes)
        return out

    def _encode_sentences(self, name: str, key: str, tok, docs, out) -> None:
        """Megatron-LM's rule: the text split in pieces of at most :data:`SPLIT_CHARS` characters,
        each cut into sentences; a sentence of no tokens is dropped, EOD ends the last one."""
        sentences = [[s for a in range(0, len(text), SPLIT_CHARS) for s in self.splitter(text[a:a + SPLIT_CHARS])]
                     for _, text in docs]
        encoded = iter(tok.encode_batch([s for doc in sentences for s in doc]) if any(sentences) else [])
        for (i, _), doc in zip(docs, sentences):
            ids: List[int] = []
            lengths: List[int] = []
            for _ in doc:
                piece = next(encoded)
                if piece:
                    ids.extend(piece)
                    lengths.append(len(piece))
            if ids and self.append_eod:
                ids.append(tok.eod_id)
                lengths[-1] += 1
            out[i].ids[(name, key)] = ids
            out[i].roles[(name, key)] = None
            out[i].sentences[(name, key)] = lengths

    def _encode_chats(self, name: str, tok, chats, out) -> None:
        specials = self._special_ids[name]
        texts = [s.text for _, _, segs in chats for s in segs if not s.special]
        encoded = iter(tok.encode_batch(texts) if texts else [])
        for i, key, segs in chats:
            ids: List[int] = []
            roles: List[int] = []
            for seg in segs:
                if seg.special:
                    if seg.text not in specials:
                        raise InputError(f"tokenizer {name!r} has no id for {seg.text} (chat records need "
                                         f"a tokenizer with the Harmony special tokens)")
                    piece = [specials[seg.text]]
                else:
                    piece = list(next(encoded))
                ids.extend(piece)
                roles.extend([seg.role] * len(piece))
            if self.append_eod:
                ids.append(tok.eod_id)
                roles.append(ROLE_NONE)
            out[i].ids[(name, key)] = ids
            out[i].roles[(name, key)] = roles


SPLIT_CHARS = 1_000_000  # Megatron-LM's preprocess_data.py splits texts in pieces of this many characters


def sentence_splitter(lang: str):
    """NLTK's punkt sentence splitter for ``lang`` from local data (``punkt_tab``; nothing is
    downloaded): its ``tokenize``; a missing model or NLTK is one line naming what to install."""
    try:
        from nltk.tokenize import PunktTokenizer
    except ImportError:
        raise InputError("--split-sentences needs NLTK (pip install nltk) and its punkt_tab data") from None
    try:
        return PunktTokenizer(lang).tokenize
    except (LookupError, ValueError, OSError):
        raise InputError(f"--split-sentences: NLTK's punkt model tokenizers/punkt_tab/{lang}/ is not installed "
                         f"(not under NLTK_DATA or nltk.data.path; this tool does not download: run "
                         f"'python -m nltk.downloader punkt_tab' where there is a network and set NLTK_DATA)") from None
