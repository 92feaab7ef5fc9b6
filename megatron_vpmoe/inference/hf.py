"""The backend for a local Hugging Face causal-LM directory (this project's converted checkpoints included), generating with ``transformers``' ``generate``."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Optional

import torch

from megatron_vpmoe.inference.backend import Backend, SampleParams, stop_when, truncate_at_stop
from megatron_vpmoe.inference.logprobs import token_logprobs
from megatron_vpmoe.utils.errors import InputError


def _json_object(file: Path) -> dict:
    """``file``'s JSON object, or {} when there is no such file."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{file}: not valid JSON ({err})") from None
    except RecursionError:  # json recurses per nesting level
        raise InputError(f"{file}: JSON nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise InputError(f"{file}: expected a JSON object")
    return data


class HFBackend(Backend):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory.

    Code shipped in the directory (``auto_map``) runs only with ``trust_remote_code``. A VPMoE
    directory written by ``vpmoe convert to-hf`` loads without it: the model classes come from
    this package (``model/hf_template``), never from the directory's copies. Sequences longer
    than the model's positions (``max_position_embeddings``/``n_positions``, or a larger
    ``max_length`` set on purpose) are refused with an :class:`InputError`."""

    name = "hf"

    def __init__(self, path: str, *, model_id: Optional[str] = None, batch_size: int = 8,
                 max_length: Optional[int] = None, device: str = "cpu", dtype: str = "float32",
                 trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = str(path)
        self.model_id = model_id or Path(path).name
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
            from megatron_vpmoe.model.hf_template.modeling_vpmoe import VpmoeForCausalLM as model_class
        else:
            model_class = AutoModelForCausalLM
        try:
            self.model = model_class.from_pretrained(
                self.path, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype), local_files_only=True
            ).to(self.device).eval()
            # the model's config: AutoTokenizer would otherwise read config.json as a bare
            # PretrainedConfig and warn "a model of type vpmoe to instantiate a model of type ``"
            tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code,
                                                      local_files_only=True, config=self.model.config)
        except (OSError, ValueError, KeyError, SafetensorError) as err:  # missing/corrupt files, unknown model type
            reason = " ".join(str(err).split())
            raise InputError(f"{path}: not a loadable Hugging Face causal LM directory ({type(err).__name__}: "
                             f"{reason[:300]})") from None
        cfg = self.model.config
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.max_length = int(max_length or self.max_positions or 2048)
        self.batch_size = batch_size
        self.vocab_size = cfg.vocab_size
        self._set_tokenizer(tokenizer, cfg.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self._lock = threading.RLock()  # torch's global RNG is seeded per call

    def _check_length(self, n: int) -> None:
        most = max(self.max_positions or 0, self.max_length)
        if n > most:
            raise InputError(f"sequence of {n} tokens exceeds the model's {most} positions")

    def forward_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self._check_length(input_ids.shape[1])
        mask = (torch.arange(input_ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
        return self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits.cpu()

    def generate(self, prompts, params: SampleParams, cancelled=None):
        width = max(len(p) for p in prompts)
        self._check_length(width + params.max_new_tokens)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        greedy = params.temperature <= 0
        kwargs = {}
        if params.stop_strings:
            kwargs.update(stop_strings=list(params.stop_strings), tokenizer=self.tokenizer)
        with self._lock, torch.no_grad(), stop_when(self.model, cancelled):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=params.max_new_tokens, do_sample=not greedy,
                temperature=None if greedy else params.temperature, top_p=None if greedy else params.top_p,
                top_k=None, eos_token_id=list(params.stop_ids) or None, pad_token_id=self.pad_id,
                output_logits=params.logprobs, return_dict_in_generate=True, **kwargs)
        new = out.sequences[:, width:].cpu()
        if params.logprobs:  # the untempered log-prob of each sampled token
            lp = token_logprobs(torch.stack(out.logits, dim=1).cpu(), new).tolist()
        else:
            lp = [[] for _ in prompts]
        stop = set(params.stop_ids)
        return [truncate_at_stop(new[i].tolist(), lp[i], stop, params.max_new_tokens) for i in range(len(prompts))]

    def describe(self) -> dict:
        return {**super().describe(), "model_type": getattr(self.model.config, "model_type", None)}
