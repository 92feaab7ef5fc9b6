"""A toy GPT-OSS teacher: ``transformers``' ``GptOssForCausalLM`` with the real o200k Harmony tokenizer.

The architecture nobody here wrote (alternating sliding/full attention with sinks, a routed MoE,
YaRN RoPE), at toy size, with the full 201,088-token vocabulary of GPT-OSS's tokenizer (built
offline from ``o200k_base.tiktoken``; ids equal ``openai_harmony``'s) and a Harmony chat
template plus response template (:mod:`megatron_vpmoe.serve.harmony_hf`), saved as a plain
Hugging Face directory. ``vpmoe serve`` and ``transformers serve`` both serve it. It is trained
briefly on Harmony-rendered GSM8K solutions (analysis = worked solution, final = the answer),
plus two listwise rankings in the ``rank`` scorer's request format (the correct answer first), with
the loss on the assistant tokens only, so it answers in Harmony channels instead of noise.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_vpmoe.data.chat import render_prompt
from megatron_vpmoe.distill.scorers import rank_request
from megatron_vpmoe.distill.toy_teacher import read_gsm8k_conversations
from megatron_vpmoe.tokenizers.specials import BOS_TOKEN, CHANNEL, EOD_TOKEN, HARMONY_STOPS, MESSAGE, RETURN, START
from megatron_vpmoe.utils.atomic import atomic_directory
from megatron_vpmoe.utils.errors import InputError

ASSISTANT = START + "assistant"


def gpt_oss_toy_config(tok, *, hidden: int = 64, layers: int = 2, experts: int = 4, max_positions: int = 4096):
    """A toy ``GptOssConfig`` for tokenizer ``tok``: GPT-OSS's layer pattern, sinks, MoE and YaRN at ``hidden`` width."""
    from transformers import GptOssConfig

    ids = tok.convert_tokens_to_ids
    return GptOssConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, num_local_experts=experts,
        num_experts_per_tok=2, sliding_window=128, max_position_embeddings=max_positions,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        tie_word_embeddings=True, bos_token_id=ids(BOS_TOKEN), eos_token_id=[ids(t) for t in HARMONY_STOPS],
        pad_token_id=ids(EOD_TOKEN))


def _training_texts(path: str, examples: int) -> list:
    """Harmony texts: the first GSM8K solutions, then two rankings in the rank scorer's format."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file (pass --gsm8k FILE, a GSM8K jsonl)")
    pairs = read_gsm8k_conversations(path, examples)
    texts, recs = [t for t, _ in pairs], [r for _, r in pairs]
    if len(recs) >= 2:  # one listwise ranking (the 'rank' scorer's request): the right answer first
        answers = [f"The answer is {r['answer'].rsplit('####', 1)[1].strip()}." for r in recs[:2]]
        for order, listed in (("1 > 2", answers), ("2 > 1", answers[::-1])):
            prompt = render_prompt([{"role": "user", "content": rank_request(recs[0]["question"], listed)}])
            texts.append(f"{prompt}{CHANNEL}final{MESSAGE}{order}{RETURN}")
    return texts


def harmony_hf_tokenizer():
    """The o200k Harmony tokenizer as a ``transformers`` fast tokenizer with Harmony chat/response templates."""
    from transformers import PreTrainedTokenizerFast

    from megatron_vpmoe.serve.harmony_hf import HARMONY_RESPONSE_TEMPLATE, harmony_chat_template
    from megatron_vpmoe.tokenizers.tiktoken_variant import harmony_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=harmony_tokenizer().hf_tokenizer(), bos_token=BOS_TOKEN,
                                  eos_token=RETURN, pad_token=EOD_TOKEN)
    tok.chat_template = harmony_chat_template()
    tok.response_template = HARMONY_RESPONSE_TEMPLATE
    return tok


def build_gpt_oss_teacher(gsm8k_path: str, out_dir: str, *, examples: int = 4, steps: int = 100,
                          hidden: int = 64, layers: int = 2, experts: int = 4, lr: float = 1e-2,
                          seed: int = 0, overwrite: bool = False) -> Path:
    """Train and save the toy GPT-OSS teacher (module docstring); returns ``out_dir``."""
    import torch
    from transformers import GenerationConfig, GptOssForCausalLM

    if Path(out_dir).exists() and not overwrite:
        raise InputError(f"{out_dir} already exists (pass --overwrite to replace it)")
    if not 2 <= layers <= 64 or experts < 2 or hidden < 16 or hidden % 4 or steps < 0 or examples < 1:
        raise InputError("toy GPT-OSS teacher: need 2 <= --layers <= 64, --experts >= 2, --hidden a multiple "
                         "of 4 and >= 16, --steps >= 0, --examples >= 1")
    texts = _training_texts(gsm8k_path, examples)
    tok = harmony_hf_tokenizer()
    rows, starts = [], []
    for text in texts:
        cut = text.index(ASSISTANT) + len(ASSISTANT)  # the loss covers what the assistant writes
        rows.append(tok.encode(text[:cut]) + tok.encode(text[cut:]))
        starts.append(len(tok.encode(text[:cut])))
    torch.manual_seed(seed)
    config = gpt_oss_toy_config(tok, hidden=hidden, layers=layers, experts=experts)
    model = GptOssForCausalLM(config)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    # predicted positions: assistant tokens only (the full-vocab head runs on these rows only)
    pos = [(i, t) for i, r in enumerate(rows) for t in range(starts[i] - 1, len(r) - 1)]
    bi, ti = torch.tensor([p[0] for p in pos]), torch.tensor([p[1] for p in pos])
    targets = ids[bi, ti + 1]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr / 10)
    model.train()
    losses = []
    for _ in range(steps):
        hidden_states = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden_states[bi, ti]).float()
        loss = torch.nn.functional.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=True, temperature=1.0, top_p=1.0)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "toy_teacher.json").write_text(json.dumps(
            {"arch": "gpt-oss", "examples": len(texts), "steps": steps, "first_loss": losses[0] if losses else None,
             "final_loss": losses[-1] if losses else None, "losses": [round(x, 3) for x in losses], "assistant_tokens": len(pos)}, indent=1) + "\n")
    return Path(out_dir)
