"""VPMoE as a Hugging Face causal LM (remote code; self-contained, no megatron_vpmoe import).

A second implementation of the native forward pass (``megatron_vpmoe.model``), kept small:
GQA or tensor product attention (TPA) with QK-norm, RoPE / GRAPE-M / ALiBi positions,
sliding-window (local) and full (global) layers, per-head attention sinks and value residual
(mixed in factor form when layer 0 is TPA); group-limited top-k MoE with a shared expert.
Parameter names equal the native state-dict keys, so conversion is a rename-free copy.
Generation uses a ``DynamicCache`` built from ``config.layer_types``: local layers keep only
their window; TPA layers (and layers mixing TPA values) store their factors flattened per token
as the cache's key/value states ``[B, 1, S, width]``, never expanded keys and values.
A test checks that logits equal the native model's within 1e-4 in fp32.
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_vpmoe import VpmoeConfig

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class VpmoeNorm(nn.Module):
    def __init__(self, width, config):
        super().__init__()
        self.eps = config.norm_epsilon
        self.layer_norm = config.normalization == "LayerNorm"
        self.weight = nn.Parameter(torch.ones(width))
        if self.layer_norm:
            self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        if self.layer_norm:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def activation(name, x):
    if name == "squared_relu":
        return torch.square(F.relu(x))
    if name == "gelu":
        return F.gelu(x)
    gate, up = x.chunk(2, dim=-1)  # swiglu
    return F.silu(gate) * up


def rope(x, positions, base, inv_freq=None):
    """Rotate-half rotary embedding; ``inv_freq`` (GRAPE-M's learned frequencies) defaults to RoPE's."""
    d = x.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.float()
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).unsqueeze(2)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).unsqueeze(2)
    xf = x.float()
    rotated = torch.cat([-xf[..., d // 2:], xf[..., : d // 2]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class GrapeM(nn.Module):
    """GRAPE-M: rotations by per-plane frequencies (a log-scale on RoPE's) in the column-pair planes
    of an orthogonal basis ``P = matrix_exp(S - S^T)``; applies ``R(n w) P^T x``."""

    def __init__(self, config):
        super().__init__()
        d = config.kv_channels
        self.base = config.rotary_base
        self.freq_log_scale = nn.Parameter(torch.zeros(d // 2)) if config.grape_m_learnable_freq else None
        self.basis_skew = nn.Parameter(torch.zeros(d, d)) if config.grape_m_learnable_basis else None

    def forward(self, x, positions):
        d = x.shape[-1]
        freq = 1.0 / (self.base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
        if self.freq_log_scale is not None:
            freq = freq * torch.exp(self.freq_log_scale.float())
        if self.basis_skew is not None:
            s = self.basis_skew.float()
            x = (x.float() @ torch.linalg.matrix_exp(s - s.t())).to(x.dtype)
        return rope(x, positions, self.base, freq)


def alibi_slopes(heads):
    def geometric(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads & (heads - 1) == 0:
        return geometric(heads)
    low = 2 ** int(math.floor(math.log2(heads)))
    return geometric(low) + geometric(2 * low)[0::2][: heads - low]


def attend(q, k, v, sinks, window, key_mask, alibi=None):
    """Causal attention; ``q [B,Sq,H,D]``, ``k, v [B,Sk,G,D]``, queries are the last Sq keys;
    ``key_mask [B,Sk]`` (True = real token) hides padding; ``alibi [H]`` slopes add ``-m (i - j)``."""
    b, sq, h, d = q.shape
    sk, g = k.shape[1], k.shape[2]
    k = k.repeat_interleave(h // g, dim=2)
    v = v.repeat_interleave(h // g, dim=2)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qf, kf.transpose(-1, -2)) / math.sqrt(d)
    qpos = torch.arange(sk - sq, sk, device=q.device).unsqueeze(-1)
    kpos = torch.arange(sk, device=q.device).unsqueeze(0)
    if alibi is not None:
        scores = scores - alibi.float().view(1, h, 1, 1) * (qpos - kpos).float()
    visible = (kpos <= qpos).unsqueeze(0).unsqueeze(0)
    if window is not None:
        visible = visible & (kpos > qpos - window)
    if key_mask is not None:
        visible = visible & key_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, h, 1, 1).expand(b, h, sq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores.masked_fill(~visible.any(-1, keepdim=True), 0.0), dim=-1)
    return torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)


def group_factors(v, heads):
    """GQA values ``[B,S,G,D]`` as factors: head h's head factor is the one-hot of its group."""
    b, s, g, _ = v.shape
    onehot = torch.eye(g, dtype=v.dtype, device=v.device).repeat_interleave(heads // g, dim=0)
    return onehot.expand(b, s, heads, g), v


def flat(*tensors):
    """Per-token factors flattened into one cache row ``[B, 1, S, width]``."""
    b, s = tensors[0].shape[:2]
    return torch.cat([t.reshape(b, s, -1) for t in tensors], dim=-1).unsqueeze(1)


class VpmoeAttention(nn.Module):
    """GQA (``linear_qkv``) or TPA (``linear_a`` head factors, ``linear_b`` dim factors)."""

    def __init__(self, config, layer_number):
        super().__init__()
        self.config, self.layer_number = config, layer_number
        d, bias = config.kv_channels, config.add_bias_linear
        self.heads, self.groups = config.num_attention_heads, config.num_query_groups
        self.tpa = config.attention_kind(layer_number) == "tpa"
        self.rq, self.rk = config.tpa_q_rank, config.tpa_kv_rank
        self.linear_proj = nn.Linear(self.heads * d, config.hidden_size, bias=bias)
        if config.qk_layernorm:
            self.q_norm = VpmoeNorm(d, config)
            self.k_norm = VpmoeNorm(d, config)
        if config.softmax_offset:
            self.sinks = nn.Parameter(torch.zeros(self.heads))
        self.mix_values = config.value_residual and layer_number > 0
        if self.mix_values:
            self.value_lambda = nn.Parameter(torch.tensor(0.5))
        is_global = config.is_global_layer(layer_number)
        self.window = None if is_global else config.window_size
        self.position = config.position_kind(layer_number)
        if self.position == "grape_m":
            self.grape = GrapeM(config)
        if self.tpa:
            ranks = self.rq + 2 * self.rk
            self.linear_a = nn.Linear(config.hidden_size, self.heads * ranks, bias=bias)
            self.linear_b = nn.Linear(config.hidden_size, ranks * d, bias=bias)
        else:
            self.linear_qkv = nn.Linear(config.hidden_size, (self.heads + 2 * self.groups) * d, bias=bias)
        self.factor_values = self.tpa or (self.mix_values and config.attention_kind(0) == "tpa")

    def encode(self, x, positions):
        if self.position == "rope":
            return rope(x, positions, self.config.rotary_base)
        if self.position == "grape_m":
            return self.grape(x, positions)
        return x

    def first_factors(self, v_first):
        if self.config.attention_kind(0) == "tpa":
            return v_first[..., :self.heads].transpose(-1, -2), v_first[..., self.heads:]
        return group_factors(v_first, self.heads)

    def forward(self, x, positions, v_first, cache, key_mask):
        b, s, _ = x.shape
        d = self.config.kv_channels
        if self.tpa:
            rq, rk = self.rq, self.rk
            a = self.linear_a(x).view(b, s, self.heads, rq + 2 * rk)
            f = self.linear_b(x).view(b, s, rq + 2 * rk, d)
            aq, bq = a[..., :rq] / rq, f[:, :, :rq]
            ak, bk = a[..., rq:rq + rk] / rk, f[:, :, rq:rq + rk]
            av, bv = a[..., rq + rk:] / rk, f[:, :, rq + rk:]
            raw_v = torch.cat([av.transpose(-1, -2), bv], dim=-1)
            if self.config.qk_layernorm:
                bq, bk = self.q_norm(bq), self.k_norm(bk)
            bq, bk = self.encode(bq, positions), self.encode(bk, positions)
            q = aq @ bq
        else:
            rep = self.heads // self.groups
            qkv = self.linear_qkv(x).view(b, s, self.groups, rep + 2, d)
            q = qkv[:, :, :, :rep].reshape(b, s, self.heads, d)
            k, v = qkv[:, :, :, rep], qkv[:, :, :, rep + 1]
            raw_v = v
            if self.config.qk_layernorm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.encode(q, positions), self.encode(k, positions)
            if self.factor_values:
                av, bv = group_factors(v, self.heads)
            elif self.mix_values:
                v = self.value_lambda * v + (1.0 - self.value_lambda) * v_first
        if self.factor_values:
            if self.mix_values:  # lam * own + (1 - lam) * layer 0's, ranks concatenated
                a0, b0 = self.first_factors(v_first)
                av = torch.cat([self.value_lambda * av, (1.0 - self.value_lambda) * a0], dim=-1)
                bv = torch.cat([bv, b0.to(bv.dtype)], dim=-2)
            rv = av.shape[-1]
            if self.tpa:
                key_row = flat(ak, bk)
            else:
                key_row = k.transpose(1, 2)
            if cache is not None:
                key_row, value_row = cache.update(key_row, flat(av, bv), self.layer_number)
                av, bv = value_row[:, 0, :, :self.heads * rv], value_row[:, 0, :, self.heads * rv:]
                sk = av.shape[1]
                av, bv = av.reshape(b, sk, self.heads, rv), bv.reshape(b, sk, rv, d)
                if self.tpa:
                    ak = key_row[:, 0, :, :self.heads * rk].reshape(b, sk, self.heads, rk)
                    bk = key_row[:, 0, :, self.heads * rk:].reshape(b, sk, rk, d)
                else:
                    k = key_row.transpose(1, 2)
            k = ak @ bk if self.tpa else k.repeat_interleave(self.heads // self.groups, dim=2)
            v = av @ bv
        elif cache is not None:
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_number)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, -k.shape[1]:]
        sinks = self.sinks if self.config.softmax_offset else None
        alibi = None  # computed here: a non-persistent buffer would not survive meta-device loading
        if self.position == "alibi":
            alibi = torch.tensor(alibi_slopes(self.heads), dtype=torch.float32, device=q.device)
        out = attend(q, k, v, sinks, self.window, mask, alibi)
        return self.linear_proj(out.reshape(b, s, self.heads * d)), raw_v


class VpmoeMLP(nn.Module):
    def __init__(self, config, width):
        super().__init__()
        up = 2 * width if config.activation == "swiglu" else width
        self.act = config.activation
        self.linear_fc1 = nn.Linear(config.hidden_size, up, bias=config.add_bias_linear)
        self.linear_fc2 = nn.Linear(width, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x):
        return self.linear_fc2(activation(self.act, self.linear_fc1(x)))


class VpmoeRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.num_moe_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("expert_bias", torch.zeros(config.num_moe_experts, dtype=torch.float32))

    def forward(self, tokens):
        c = self.config
        logits = F.linear(tokens.float(), self.weight.float())
        scores = torch.sigmoid(logits) if c.moe_router_score_function == "sigmoid" else torch.softmax(logits, -1)
        select = scores + self.expert_bias.float() if c.moe_router_enable_expert_bias else scores
        n, e = scores.shape
        if c.moe_router_num_groups > 1:
            per_group = e // c.moe_router_num_groups
            grouped = select.view(n, c.moe_router_num_groups, per_group)
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)
            keep = group_scores.topk(c.moe_router_group_topk, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            select = select.masked_fill(~mask.unsqueeze(-1).expand(-1, -1, per_group).reshape(n, e), float("-inf"))
        indices = select.topk(c.moe_router_topk, dim=-1).indices
        weights = scores.gather(1, indices)
        if c.moe_router_score_function == "sigmoid" and c.moe_router_topk > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * c.moe_router_topk_scaling_factor, indices


class VpmoeExperts(nn.Module):
    """Routed experts as stacked ``[E, in, out]`` weights (``x @ W``), like the native model."""

    def __init__(self, config):
        super().__init__()
        e, h, f = config.num_moe_experts, config.hidden_size, config.moe_ffn_hidden_size
        up = 2 * f if config.activation == "swiglu" else f
        self.act = config.activation
        self.fc1_weight = nn.Parameter(torch.zeros(e, h, up))
        self.fc2_weight = nn.Parameter(torch.zeros(e, f, h))
        self.with_bias = config.add_bias_linear
        if self.with_bias:
            self.fc1_bias = nn.Parameter(torch.zeros(e, up))
            self.fc2_bias = nn.Parameter(torch.zeros(e, h))

    def forward(self, tokens, weights, indices):
        out = torch.zeros_like(tokens)
        for expert in indices.unique().tolist():
            rows, slot = (indices == expert).nonzero(as_tuple=True)
            x = tokens[rows] @ self.fc1_weight[expert].to(tokens.dtype)
            if self.with_bias:
                x = x + self.fc1_bias[expert].to(tokens.dtype)
            y = activation(self.act, x) @ self.fc2_weight[expert].to(tokens.dtype)
            if self.with_bias:
                y = y + self.fc2_bias[expert].to(tokens.dtype)
            out.index_add_(0, rows, y * weights[rows, slot].unsqueeze(-1).to(y.dtype))
        return out


class VpmoeMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = VpmoeRouter(config)
        self.experts = VpmoeExperts(config)
        if config.moe_shared_expert_intermediate_size > 0 and config.moe_num_shared_experts > 0:
            self.shared_experts = nn.ModuleList([VpmoeMLP(config, config.moe_shared_expert_intermediate_size)
                                                 for _ in range(config.moe_num_shared_experts)])
        else:
            self.shared_experts = None

    def forward(self, x):
        b, s, h = x.shape
        tokens = x.reshape(b * s, h)
        weights, indices = self.router(tokens)
        out = self.experts(tokens, weights, indices)
        if self.shared_experts is not None:
            for shared in self.shared_experts:
                out = out + shared(tokens)
        return out.view(b, s, h)


class VpmoeLayer(nn.Module):
    def __init__(self, config, layer_number):
        super().__init__()
        self.input_layernorm = VpmoeNorm(config.hidden_size, config)
        self.self_attention = VpmoeAttention(config, layer_number)
        self.pre_mlp_layernorm = VpmoeNorm(config.hidden_size, config)
        if config.is_moe_layer(layer_number):
            self.mlp = VpmoeMoE(config)
        else:
            self.mlp = VpmoeMLP(config, config.ffn_hidden_size)

    def forward(self, x, positions, v_first, cache, key_mask):
        attn, values = self.self_attention(self.input_layernorm(x), positions, v_first, cache, key_mask)
        x = x + attn
        return x + self.mlp(self.pre_mlp_layernorm(x)), values


class VpmoePreTrainedModel(PreTrainedModel):
    config_class = VpmoeConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = False
    _no_split_modules = ["VpmoeLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.init_method_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


class VpmoeForCausalLM(VpmoePreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): VpmoeLayer(config, i) for i in range(config.num_layers)})
        self.final_layernorm = VpmoeNorm(config.hidden_size, config)
        if config.untie_embeddings_and_output_weights:
            self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding

    def set_input_embeddings(self, value):
        self.embedding = value

    def get_output_embeddings(self):
        return self.output_layer if self.config.untie_embeddings_and_output_weights else None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep=0, **kwargs):
        b, s = input_ids.shape
        past_key_values = cache if cache is not None else past_key_values  # "cache" since transformers 5.x
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=input_ids.device).unsqueeze(0).expand(b, s)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask
        hidden = self.embedding(input_ids)
        v_first = None
        for key, layer in self.layers.items():
            hidden, values = layer(hidden, position_ids, v_first, past_key_values, key_mask)
            if key == "0":
                v_first = values
        hidden = self.final_layernorm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        weight = self.output_layer.weight if self.config.untie_embeddings_and_output_weights else self.embedding.weight
        logits = F.linear(hidden.float(), weight.float())
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: past_key_values})
