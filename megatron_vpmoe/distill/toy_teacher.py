"""A toy Harmony teacher for tests, benchmarks and the CPU quickstart.

Trains, in seconds on a CPU, a tiny GPT-2 (``transformers``) with its own byte-level BPE
(``tokenizers``, Harmony special tokens added) on Harmony-rendered GSM8K conversations: the
worked solution in the ``analysis`` channel and the final number in the ``final`` channel. The
result is a Hugging Face directory that ``vpmoe serve`` serves like any teacher, emitting
reasoning and final channels, with a tokenizer that differs from every student's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from megatron_vpmoe.data.chat_format import HARMONY_SPECIALS, HARMONY_STOPS, render_harmony_prompt
from megatron_vpmoe.utils.atomic import atomic_directory
from megatron_vpmoe.utils.errors import InputError

_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_conversation(question: str, answer: str) -> str:
    """The Harmony text of one solved GSM8K problem (prompt + analysis + final)."""
    if "####" not in answer:
        raise InputError("GSM8K answer without '#### N'")
    work, final = answer.rsplit("####", 1)
    prompt = render_harmony_prompt([{"role": "user", "content": question}])
    return (f"{prompt}<|channel|>analysis<|message|>{_CALC.sub('', work).strip()}<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>The answer is {final.strip()}.<|return|>")


def read_gsm8k_conversations(path: str, examples: int) -> list:
    """The first ``examples`` records of a GSM8K jsonl as (Harmony text, record) pairs."""
    out = []
    with open(path, encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if len(out) >= examples:
                    break
                rec = json.loads(line)
                out.append((gsm8k_conversation(rec["question"], rec["answer"]), rec))
        except (ValueError, KeyError, TypeError, InputError) as err:  # UnicodeDecodeError is a ValueError
            raise InputError(f"{path}:{lineno + 1 if isinstance(err, UnicodeDecodeError) else lineno}: "
                             f"not a GSM8K record ({type(err).__name__}: {err})") from None
    if not out:
        raise InputError(f"{path}: no GSM8K records")
    return out


def build_toy_teacher(gsm8k_path: str, out_dir: str, *, examples: int = 4, steps: int = 80,
                      vocab_size: int = 400, hidden: int = 64, layers: int = 2, seed: int = 0,
                      overwrite: bool = False) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    if Path(out_dir).exists() and not overwrite:
        raise InputError(f"{out_dir} already exists (pass --overwrite to replace it)")
    if not Path(gsm8k_path).is_file():
        raise InputError(f"{gsm8k_path}: no such file (pass --gsm8k FILE, a GSM8K jsonl)")
    texts = [text for text, _ in read_gsm8k_conversations(gsm8k_path, examples)]
    specials = list(dict.fromkeys(HARMONY_SPECIALS + HARMONY_STOPS + ("<|endoftext|>",)))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|return|>",
                                  pad_token="<|endoftext|>")
    ids = [tok.encode(t) for t in texts]
    width = max(len(x) for x in ids)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=max(512, 1 << (width + 256).bit_length()),
                        n_embd=hidden, n_layer=layers, n_head=4, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    batch = torch.full((len(ids), width), tok.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
        labels[i, : len(x)] = torch.tensor(x)
    mask = (labels != -100).long()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "toy_teacher.json").write_text(json.dumps(
            {"examples": len(texts), "steps": steps, "final_loss": float(loss.detach())}, indent=1))
    return Path(out_dir)
