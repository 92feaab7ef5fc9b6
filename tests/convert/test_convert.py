"""Conversion to and from Hugging Face format: the converted tiny model loads (with
``trust_remote_code``, or with this package's model code without it) and matches the native model (logits, greedy generation, tokenizer), and
native -> HF -> native is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_vpmoe.cli import main

WINDOW = 8


def _train_tokenizer(out, shared_data):
    from megatron_vpmoe.tokenizers.train import train_bpe

    train_bpe([(shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:50_000]], 400).save(out)


def _native_model(cfg):
    from megatron_vpmoe.model import VpmoeModel

    torch.manual_seed(0)
    model = VpmoeModel(cfg).eval()
    with torch.no_grad():  # move the parameters that init to constants off their defaults
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "value_lambda")) or "norm" in name:
                p.add_(torch.empty_like(p).uniform_(-0.3, 0.3))
        for moe in model.moe_layers():
            moe.router.expert_bias.uniform_(-0.05, 0.05)
    return model


@pytest.fixture(scope="module")
def native_ckpt(tmp_path_factory, shared_data, repo_root):
    from megatron_vpmoe.config import dump_config, load_config
    from megatron_vpmoe.convert.checkpoint_io import write_native_checkpoint

    root = tmp_path_factory.mktemp("convert")
    _train_tokenizer(root / "tokenizer", shared_data)
    cfg = load_config(repo_root / "examples" / "configs" / "tiny-cpu.yaml", [
        "model.vocab_size=512", f"model.window_size={WINDOW}", "model.hidden_size=64",
        "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_intermediate_size=32",
        f"data.tokenizer={root / 'tokenizer'}", "run.name=tiny-convert-test"])
    model = _native_model(cfg.model)
    write_native_checkpoint(root / "ckpt", model, 7, dump_config(cfg), source="test")
    return root, cfg, model


@pytest.fixture(scope="module")
def hf_dir(native_ckpt):
    root, _, _ = native_ckpt
    out = root / "hf"
    # a small shard size forces several shards and an index
    assert main(["convert", "to-hf", str(root / "ckpt"), str(out), "--max-shard-size", "0.0002"]) == 0
    return out


def test_to_hf_directory_layout(hf_dir):
    names = {p.name for p in hf_dir.iterdir()}
    for required in ("config.json", "configuration_vpmoe.py", "modeling_vpmoe.py", "model.safetensors.index.json",
                     "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert required in names, required
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_vpmoe.VpmoeForCausalLM"
    assert config["layer_types"][:4] == ["sliding_attention"] * 3 + ["full_attention"]
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    card = (hf_dir / "README.md").read_text()
    assert "active per token" in card and "embedding + head" in card and "corpus.bpe-8k_text_document" in card


def test_hf_model_matches_native(native_ckpt, hf_dir):
    from transformers import AutoModelForCausalLM

    from megatron_vpmoe.model.generation import generate

    _, cfg, native = native_ckpt
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == "VpmoeForCausalLM"
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 5 * WINDOW))  # well past the sliding window
    with torch.no_grad():
        assert (hf(ids).logits - native(ids)).abs().max().item() < 1e-4

    prompts = ids[:, :6]
    got = hf.generate(prompts, max_new_tokens=3 * WINDOW, do_sample=False, eos_token_id=None)[:, 6:]
    want = generate(native, prompts.tolist(), 3 * WINDOW)
    assert got.tolist() == want

    # the KV cache of a local layer holds only its window; left padding does not change results
    out = hf(prompts, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert cache.layers[0].is_sliding and not cache.layers[3].is_sliding
    short = prompts[1:, 2:]
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)
    mask = torch.tensor([[0, 0] + [1] * short.shape[1]])
    gen_pad = hf.generate(padded, attention_mask=mask, max_new_tokens=WINDOW + 2, do_sample=False, eos_token_id=None)
    assert gen_pad[0, 6:].tolist() == generate(native, short.tolist(), WINDOW + 2)[0]


def test_auto_tokenizer_matches_native(native_ckpt, hf_dir, shared_data):
    from transformers import AutoTokenizer

    from megatron_vpmoe.tokenizers import load

    root, _, _ = native_ckpt
    auto = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    native = load(root / "tokenizer").to_hf()
    text = (shared_data / "eval" / "mc" / "copa.jsonl").read_text()[:3000] + " caf\u00e9 \u4e2d\u6587"
    assert auto(text, add_special_tokens=False)["input_ids"] == native(text, add_special_tokens=False)["input_ids"]
    assert auto.eos_token == "<|endoftext|>" and auto.chat_template


def test_round_trip_is_bit_exact(native_ckpt, hf_dir):
    from megatron_vpmoe.training.checkpoint import load_model_state_dict, read_trainer_state, resolve_checkpoint

    root, _, model = native_ckpt
    back = root / "back"
    assert main(["convert", "from-hf", str(hf_dir), str(back)]) == 0
    original = load_model_state_dict(root / "ckpt")
    again = load_model_state_dict(back)
    assert original.keys() == again.keys()
    for key in original:
        assert original[key].dtype == again[key].dtype and torch.equal(original[key], again[key]), key
    assert read_trainer_state(resolve_checkpoint(back))["step"] == 7
    # the converted-back checkpoint is usable on its own: evaluated natively with its tokenizer
    from megatron_vpmoe.eval.requests import loglikelihood
    from megatron_vpmoe.inference.native import NativeBackend

    backend = NativeBackend(str(back))
    assert loglikelihood(backend, [("To be or not", " to be")])[0][0] < 0


def test_bf16_export(native_ckpt, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    root, cfg, native = native_ckpt
    out = tmp_path / "hf_bf16"
    assert main(["convert", "to-hf", str(root / "ckpt"), str(out), "--dtype", "bf16"]) == 0
    dtypes = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            dtypes.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    assert dtypes["embedding.weight"] == "BF16" and dtypes["layers.1.mlp.router.weight"] == "F32"
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 24))
    with torch.no_grad():
        assert (hf(ids).logits - native(ids)).abs().max().item() < 0.1  # bf16 weights, fp32 compute


def test_convert_errors(tmp_path, native_ckpt, hf_dir):
    root, _, _ = native_ckpt
    assert main(["convert", "to-hf", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert main(["convert", "to-hf", str(root / "ckpt"), str(hf_dir)]) == 2  # exists, no --overwrite
    bad = tmp_path / "bad_hf"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["convert", "from-hf", str(bad), str(tmp_path / "ck")]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_lm_evaluation_harness_runs_converted_model(hf_dir, shared_data, tmp_path):
    """``lm_eval --model hf`` on a task defined from a local file scores the converted model,
    and agrees with this project's harness on the same items."""
    import os
    import shutil
    import subprocess

    pytest.importorskip("lm_eval")
    import sys
    from pathlib import Path

    # the console script sits next to this interpreter in a venv that is not on PATH (make test)
    beside = Path(sys.executable).parent / "lm_eval"
    exe = str(beside) if beside.is_file() else shutil.which("lm_eval")
    if exe is None:
        pytest.skip("lm_eval command not found next to the interpreter or on PATH")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "vpmoe_copa_local.yaml").write_text(
        "task: vpmoe_copa_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {shared_data / 'eval' / 'mc' / 'copa.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        'target_delimiter: " "\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n')
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp_path / "ds_cache"))
    out = tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [exe, "--model", "hf", "--model_args", f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
         "--include_path", str(tasks), "--tasks", "vpmoe_copa_local", "--limit", "16", "--device", "cpu",
         "--batch_size", "4", "--output_path", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_files = list(out.rglob("results_*.json"))
    assert result_files
    acc = json.loads(result_files[0].read_text())["results"]["vpmoe_copa_local"]["acc,none"]

    from megatron_vpmoe.inference import open_backend
    from megatron_vpmoe.eval.tasks import run_multiple_choice

    ours = run_multiple_choice(open_backend(str(hf_dir)), shared_data / "eval" / "mc" / "copa.jsonl", 16)
    assert ours["acc"] == pytest.approx(acc)


def _save_sharded(rank, world_size, cfg_text, model_cfg, out):
    """Save the fixture's weights as a TP=2 / EP=2 job would: column-parallel weights split on
    dim 0, row-parallel on dim 1, routed experts split over the expert dim, all as DTensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from megatron_vpmoe.training.checkpoint import checkpoint_name

    mesh = init_device_mesh("cpu", (world_size,))
    state = {}
    for key, tensor in _native_model(model_cfg).state_dict().items():
        if key.endswith(("linear_qkv.weight", "linear_fc1.weight", "sinks")):
            placement = Shard(0)  # tensor parallel, column
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            placement = Shard(1)  # tensor parallel, row
        elif ".experts." in key:
            placement = Shard(0)  # expert parallel
        else:
            placement = Replicate()
        state[key] = distribute_tensor(tensor, mesh, [placement])
    ckpt = out / checkpoint_name(7)
    if rank == 0:
        ckpt.mkdir(parents=True)
        # format 2: a hand-made DCP checkpoint has no manifest.json to verify
        (ckpt / "trainer_state.json").write_text(json.dumps({"format": 2, "step": 7}))
        (ckpt / "config.yaml").write_text(cfg_text)
        (out / "latest").write_text(ckpt.name + "\n")
    torch.distributed.barrier()
    dcp.save({"model": state}, checkpoint_id=str(ckpt))
    return sorted({str(t.placements[0]) for t in state.values()})


def test_sharded_checkpoint_converts_like_unsharded(native_ckpt, hf_dir, tmp_path):
    from safetensors import safe_open

    from helpers.distributed import run_distributed
    from megatron_vpmoe.config import dump_config

    root, cfg, _ = native_ckpt
    placements = run_distributed(_save_sharded, 2, dump_config(cfg), cfg.model, tmp_path / "tp2ep2")
    assert placements[0] == ["R", "S(0)", "S(1)"]
    out = tmp_path / "hf_from_sharded"
    assert main(["convert", "to-hf", str(tmp_path / "tp2ep2"), str(out)]) == 0

    def tensors(directory):
        found = {}
        for shard in directory.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as fh:
                found.update({k: fh.get_tensor(k) for k in fh.keys()})
        return found

    a, b = tensors(hf_dir), tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_published_hf_directory_gets_the_umask(hf_dir):
    """mkdtemp's 0700 and safetensors' 0600 must not reach the published directory."""
    import os
    import stat

    from megatron_vpmoe.utils.atomic import current_umask

    mask = current_umask()
    assert stat.S_IMODE(os.stat(hf_dir).st_mode) == 0o777 & ~mask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in hf_dir.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert modes == {name: 0o666 & ~mask for name in modes}, modes


def _plant_payload(src, dst, marker, model_type=None):
    """Copy an HF directory, append code that creates ``marker`` to each of its .py files and
    optionally change config.json's model_type (a directory from an unknown source)."""
    import shutil

    shutil.copytree(src, dst)
    for py in dst.glob("*.py"):
        py.write_text(py.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    if model_type:
        config = json.loads((dst / "config.json").read_text())
        config["model_type"] = model_type
        (dst / "config.json").write_text(json.dumps(config))


def test_eval_runs_no_code_from_the_directory_without_trust_remote_code(hf_dir, tmp_path, capsys):
    """A VPMoE directory loads with this package's model code; its own .py files never run."""
    from megatron_vpmoe.inference import open_backend

    marker = tmp_path / "PAYLOAD_RAN"
    planted = tmp_path / "planted"
    _plant_payload(hf_dir, planted, marker)
    backend = open_backend(str(planted))
    assert type(backend.model).__module__ == "megatron_vpmoe.model.hf_template.modeling_vpmoe"
    ids = torch.tensor([[1, 2, 3, 4]])
    clean = open_backend(str(hf_dir))
    assert torch.equal(backend.forward_logits(ids, torch.tensor([4])), clean.forward_logits(ids, torch.tensor([4])))
    assert not marker.exists()


def test_eval_needs_trust_remote_code_for_unknown_remote_code(hf_dir, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    planted = tmp_path / "planted"
    _plant_payload(hf_dir, planted, marker, model_type="vpmoe_fork")
    out = tmp_path / "eval"
    rc = main(["eval", str(planted), "--tasks", "bpb", "--limit", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--trust-remote-code" in err and "auto_map" in err, err
    assert not marker.exists() and not out.exists()
    # the explicit opt-in runs the directory's code, as transformers does
    from megatron_vpmoe.inference import open_backend

    backend = open_backend(str(planted), trust_remote_code=True)
    assert type(backend.model).__module__ != "megatron_vpmoe.model.hf_template.modeling_vpmoe"
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("cut", ["half", "header"])
def test_from_hf_truncated_safetensors_is_one_line(hf_dir, tmp_path, capsys, cut):
    import shutil

    broken = tmp_path / "hf"
    shutil.copytree(hf_dir, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if cut == "half" else data[:6])
    rc = main(["convert", "from-hf", str(broken), str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and shard.name in err, err
    assert not (tmp_path / "ckpt").exists()


def test_locked_attention_converts_with_logits_parity(native_ckpt, tmp_path):
    """TPA + GRAPE-M (learned frequencies and basis moved off their init) local layers, GQA + ALiBi
    global layers: the HF model's logits within 1e-5 of native and identical greedy generation,
    with TPA's factors (not expanded K/V) in the HF cache."""
    from transformers import AutoModelForCausalLM

    from megatron_vpmoe.config import dump_config, load_config
    from megatron_vpmoe.convert.checkpoint_io import write_native_checkpoint
    from megatron_vpmoe.model.generation import generate

    root, _, _ = native_ckpt
    cfg = load_config("examples/configs/tiny-cpu.yaml", [
        "model.vocab_size=512", f"model.window_size={WINDOW}", "model.hidden_size=64",
        "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_intermediate_size=32",
        "model.local_attention=tpa", "model.local_position=grape_m", "model.grape_m_learnable_basis=true",
        "model.global_position=alibi", f"data.tokenizer={root / 'tokenizer'}", "run.name=tiny-locked"])
    native = _native_model(cfg.model)
    with torch.no_grad():
        for name, p in native.named_parameters():
            if ".grape." in name:
                p.normal_(0.0, 0.2)
    write_native_checkpoint(tmp_path / "ckpt", native, 3, dump_config(cfg), source="test")
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 5 * WINDOW))
    with torch.no_grad():
        assert (hf(ids).logits - native(ids)).abs().max().item() < 1e-5
    prompts = ids[:, :6]
    got = hf.generate(prompts, max_new_tokens=3 * WINDOW, do_sample=False, eos_token_id=None)[:, 6:]
    assert got.tolist() == generate(native, prompts.tolist(), 3 * WINDOW)
    out = hf(prompts, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    h, d, r = cfg.model.num_attention_heads, cfg.model.kv_channels, cfg.model.tpa_kv_rank
    assert cache.layers[0].keys.shape[-1] == r * (h + d)  # key factors of a TPA layer, flattened


def test_python_started_in_the_checkout_root_loads_the_converted_model(hf_dir, native_ckpt, repo_root):
    """The newcomer's reproduction: `python -c` in the checkout root (the root first on sys.path) loads
    a converted model with transformers. A top-level ``kernels`` package in the root shadowed Hugging
    Face's ``kernels`` (a transformers dependency) and this failed with an ImportError."""
    import subprocess
    import sys

    _, _, model = native_ckpt
    ids = [[1, 2, 3, 4, 5, 6]]
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM as A\n"
        f"m = A.from_pretrained({str(hf_dir)!r}, trust_remote_code=True).eval()\n"
        f"with torch.no_grad(): print(json.dumps(m(torch.tensor({ids})).logits[0, -1, :4].tolist()))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        want = model(torch.tensor(ids))[0, -1, :4]
    got = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
