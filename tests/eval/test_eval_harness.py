"""The evaluation harness on known answers: an oracle scores 100%, a uniform model chance,
bits per byte is the summed token NLL over UTF-8 bytes, and ``vpmoe eval`` writes its report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.needs import need_data
from megatron_vpmoe.eval import tasks as T
from megatron_vpmoe.eval.harness import EvalOptions, run_eval
from megatron_vpmoe.eval.requests import loglikelihood
from megatron_vpmoe.inference.backend import Backend, SampleParams, truncate_at_stop
from megatron_vpmoe.training.loss import bits_per_byte

PREFIX = 256  # the byte models' document-start token


def greedy_by_forwards(backend, prompts, max_new_tokens, stop_ids=()):
    """Reference greedy decoding: one full forward per new token, no cache."""
    outs = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(max_new_tokens):
            logits = backend.forward_logits(torch.tensor([seq]), torch.tensor([len(seq)]))
            seq.append(int(logits[0, -1].argmax()))
            if seq[-1] in stop_ids:
                break
        outs.append(seq[len(prompt):])
    return outs


class ByteModel(Backend):
    """A byte-level scripted LM. Uniform over 257 symbols, except that after any occurrence
    of a trigger string it predicts the trigger's answer, byte by byte, while the text keeps
    matching it (logit 5 on the expected byte)."""

    name = "scripted"

    def __init__(self, script=(), max_length=4096, batch_size=4):
        self.script = [(t.encode(), a.encode()) for t, a in script]
        self.max_length, self.batch_size = max_length, batch_size
        self.eos_ids = ()
        self.calls = 0

    def generate(self, prompts, params: SampleParams, cancelled=None):
        outs = greedy_by_forwards(self, prompts, params.max_new_tokens, params.stop_ids)
        return [truncate_at_stop(o, [], set(params.stop_ids), params.max_new_tokens) for o in outs]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def prefix_token_id(self):
        return PREFIX

    def forward_logits(self, input_ids, lengths):
        self.calls += 1
        b, s = input_ids.shape
        logits = torch.zeros(b, s, 257)
        for row in range(b):
            seq = bytes(int(t) for t in input_ids[row, : int(lengths[row])] if t < 256)
            offset = int(lengths[row]) - len(seq)  # a leading prefix token shifts positions
            for trigger, answer in self.script:
                at = seq.find(trigger)
                while at >= 0:
                    end = at + len(trigger)
                    for k in range(len(answer)):
                        if seq[end : end + k] != answer[:k] or end + k - 1 + offset >= s:
                            break
                        logits[row, end + k - 1 + offset, answer[k]] = 5.0
                    at = seq.find(trigger, at + 1)
        return logits


def _mc_oracle(path, limit):
    script = []
    for lineno, rec in T.read_jsonl(path, limit):
        item = T.parse_choice_record(rec, path, lineno)
        g = item.gold
        ctx = item.contexts[g].rstrip(" ")
        script.append((ctx, item.contexts[g][len(ctx):] + item.continuations[g]))
    return script


MC_SETS = ["mmlu_stem", "copa", "piqa", "winogrande", "commonsenseqa", "openbookqa", "wsc"]


@pytest.mark.parametrize("task", MC_SETS)
def test_multiple_choice_oracle_scores_100_and_uniform_scores_chance(task):
    path = need_data("eval/" + T.MC_FILES[task]) / "eval" / T.MC_FILES[task]
    oracle = ByteModel(_mc_oracle(path, 6))
    got = T.run_multiple_choice(oracle, path, 6)
    assert got["n"] == 6 and got["acc"] == 1.0 and got["acc_norm"] == 1.0

    uniform = T.run_multiple_choice(ByteModel(), path, 6)
    # no preference at all: length-normalised accuracy is exactly the chance rate
    assert uniform["acc_norm"] == pytest.approx(uniform["chance"], abs=1e-9)
    assert 0 < uniform["chance"] < 1


def test_lambada_greedy_match(shared_data):
    path = shared_data / "eval" / T.COMPLETION_FILES["lambada"]
    script = []
    for _, rec in T.read_jsonl(path, 4):
        script.append((rec["context"], " " + rec["continuation"]))
    assert T.score_completion(ByteModel(script), path, 4)["acc"] == 1.0
    assert T.score_completion(ByteModel(), path, 4)["acc"] == 0.0


def test_gsm8k_oracle_and_uniform(shared_data):
    path = shared_data / "eval" / "gsm8k_test.jsonl"
    script = []
    for _, rec in T.read_jsonl(path, 3):
        gold = rec["answer"].split("####")[1].strip()
        script.append((f"Question: {rec['question']}\nAnswer:", f" The answer is #### {gold}\n\n"))
    fewshot = shared_data / "kd" / "gsm8k_train.jsonl"
    got = T.run_gsm8k(ByteModel(script), path, 3, shots=1, fewshot_file=fewshot, max_new_tokens=40)
    assert got["exact_match"] == 1.0 and got["n"] == 3
    assert "####" in got["examples"][0]["completion"]
    assert T.run_gsm8k(ByteModel(), path, 3, shots=1, fewshot_file=fewshot, max_new_tokens=8)["exact_match"] == 0.0


def test_long_requests_are_truncated_to_the_window():
    model = ByteModel(max_length=16)
    (short,), (long,) = loglikelihood(model, [("ctx", " abc")]), loglikelihood(model, [("ctx" * 20, " " + "x" * 40)])
    assert short[0] == pytest.approx(-4 * math.log(257))
    assert long[0] == pytest.approx(-16 * math.log(257))  # only the last 16 continuation bytes fit


def test_bits_per_byte_is_summed_nll_over_bytes(tmp_path):
    doc = "Caf\u00e9 au lait \u2014 bits per byte counts UTF-8 bytes, not characters.\n"
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": doc}) + "\n" + json.dumps({"text": doc * 3}) + "\n")
    # a model with a known distribution: the scripted one predicts part of the text
    model = ByteModel([("Caf", "\u00e9 au lait")], max_length=64)
    got = T.run_bits_per_byte(model, path, None)
    nll = 0.0
    for text in (doc, doc * 3):
        ids = model.encode(text)
        seq = [PREFIX] + ids
        logits = torch.cat([model.forward_logits(torch.tensor([seq[i : i + 64]]), torch.tensor([len(seq[i : i + 64])]))[0]
                            for i in range(0, len(seq) - 1, 64)])[: len(ids)]  # windows of 64
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids), reduction="sum"))
    nbytes = len(doc.encode()) * 4
    assert got["bytes"] == nbytes and got["tokens"] == nbytes
    assert got["bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)
    assert got["bpb"] == pytest.approx(bits_per_byte(got["nll_nats"], nbytes))
    # the uniform byte model: exactly log2(257) bits per byte
    assert T.run_bits_per_byte(ByteModel(), path, None)["bpb"] == pytest.approx(math.log2(257))


def test_long_context_buckets(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("abcdefgh" * 200)
    got = T.run_long_context(ByteModel([("abcdefgh", "abcdefgh" * 200)], max_length=32), path, 2, context=32)
    assert got["length"] == 128 and got["n"] == 2 and len(got["buckets"]) == 8
    # the scripted model predicts the repeated text perfectly after the first 8 bytes
    assert got["buckets"][-1]["loss"] < got["buckets"][0]["loss"]


def test_bad_input_names_file_and_line(tmp_path):
    from megatron_vpmoe.utils.errors import InputError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a"]}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: missing key 'gold'"):
        T.run_multiple_choice(ByteModel(), bad, None)
    with pytest.raises(InputError, match="unknown task"):
        T.resolve_tasks("bpb,nonsense")


def test_run_eval_and_report(shared_data, tmp_path):
    from megatron_vpmoe.eval.report import write_results

    options = EvalOptions(tasks=["bpb", "copa", "lambada", "long_context"], limit=2, context=64,
                          eval_dir=shared_data / "eval", progress=False)
    results = run_eval(ByteModel(max_length=256), options, model_name="uniform-bytes")
    written = write_results(results, tmp_path / "out")
    names = {p.name for p in written}
    assert names == {"results.json", "results.md", "scores.png", "long_context.png"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved["tasks"]) == {"bpb", "copa", "lambada", "long_context"}
    assert saved["tasks"]["bpb"]["bpb"] == pytest.approx(math.log2(257))
    assert "| copa |" in (tmp_path / "out" / "results.md").read_text()


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory, shared_data):
    """A randomly initialised 2-layer GPT-2 with a byte-level BPE tokenizer, saved as a local HF dir."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from megatron_vpmoe.tokenizers.train import train_bpe

    out = tmp_path_factory.mktemp("tiny_hf")
    train_bpe([(shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:50_000]], 400).save(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    return out


def test_hf_backend_bpb_matches_direct_forward(tiny_hf_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_vpmoe.inference import open_backend

    backend = open_backend(str(tiny_hf_model), batch_size=2)
    docs = ["To be, or not to be: that is the question.", "Caf\u00e9 \u2014 O Romeo, Romeo!\n" * 3]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    got = T.run_bits_per_byte(backend, path, None)

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_hf_model)
    nll = 0.0
    for d in docs:
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id  # the backend's rule
        ids = [start] + tok(d, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
    nbytes = sum(len(d.encode()) for d in docs)
    assert got["bytes"] == nbytes
    assert got["bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
    # batching and padding do not change scores
    lone = [loglikelihood(backend, [("To be, or not", " to be")])[0][0]]
    both = loglikelihood(backend, [("To be, or not", " to be"),
                                   ("A much longer context: O Romeo, Romeo, wherefore", " art")])
    assert both[0][0] == pytest.approx(lone[0], abs=1e-4)
    # generation through HF generate (KV cache) equals greedy decoding by full forwards
    prompt = [backend.encode("ROMEO:")]
    got = backend.generate(prompt, SampleParams(6, temperature=0.0, logprobs=False))
    assert [s.tokens for s in got] == greedy_by_forwards(backend, prompt, 6)


def test_vpmoe_eval_cli(tiny_hf_model, shared_data, tmp_path):
    from megatron_vpmoe.cli import main

    out = tmp_path / "report"
    rc = main(["eval", str(tiny_hf_model), "--tasks", "bpb,copa,gsm8k,long_context", "--limit", "2",
               "--shots", "1", "--max-new-tokens", "8", "--context", "32", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["copa"]["n"] == 2 and results["tasks"]["gsm8k"]["n"] == 2
    assert results["tasks"]["long_context"]["length"] == 128
    assert (out / "long_context.png").stat().st_size > 0
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "bpb"]) == 2
