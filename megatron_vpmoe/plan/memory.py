"""Per-rank memory of a layout, by component: parameters, gradients, optimizer state, activations, buffers.

Parameters, gradients and AdamW state are exact (``parallel/layout.py`` shard counts; fp32
master weights and gradients; ``exp_avg``, ``exp_avg_sq`` and a 4-byte ``step`` per tensor,
ZeRO-2 dividing the state and the reduced gradients over data-parallel replicas). Activations are what autograd saves
for backward, derived from the layer's tensor shapes op by op (``reference`` = the CPU
kernels of ``kernels/reference.py``, whose attention keeps ``[S, S]`` probabilities;
``fused`` = the GPU kernels, which keep ``q, k, v, out`` and the log-sum-exp), times the
micro-batches in flight under the schedule. Transient buffers (one layer's backward, the
head's loss chunks, all-to-all and pipeline buffers, the optimizer step) come on top at
the moment each is alive; the rank's peak is the largest of those moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List

from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model.values import first_values_shape
from megatron_vpmoe.parallel.layout import rank_layers, rank_stages, shard_parameter_count, stage_layers
from megatron_vpmoe.plan.layouts import Layout

F32 = 4
I64 = 8
LOSS_CHUNK = 1024  # rows per chunk of kernels' linear_cross_entropy


def act_bytes(precision: str) -> int:
    """Bytes of one activation element: bf16 under ``train.precision: bf16``, else fp32."""
    return 2 if precision == "bf16" else 4


def _norm_tensors(cfg: ModelConfig) -> int:
    return 2 if cfg.normalization == "LayerNorm" else 1


def shard_tensor_count(cfg: ModelConfig, pp: int, vpp: int, pp_rank: int) -> int:
    """Parameter tensors on one rank of pipeline rank ``pp_rank`` (AdamW keeps a ``step`` per tensor)."""
    bias = 2 if cfg.add_bias_linear else 1
    norm = _norm_tensors(cfg)
    n = 1 if pp_rank == 0 else 0
    if pp_rank == pp - 1:
        n += norm + (1 if cfg.untie_embeddings_and_output_weights else 0)
    for layer in rank_layers(cfg.num_layers, pp, vpp if pp > 1 else 1, pp_rank):
        n += 2 * norm + 2 * bias  # norms, qkv, proj
        n += 2 * norm if cfg.qk_layernorm else 0
        n += 1 if cfg.softmax_offset else 0
        n += 1 if cfg.value_residual and layer > 0 else 0
        if cfg.is_moe_layer(layer):
            n += 1 + 2 * bias  # router, grouped fc1/fc2
            if cfg.moe_shared_expert_intermediate_size > 0:
                n += cfg.moe_num_shared_experts * 2 * bias
        else:
            n += 2 * bias
    return n


def expert_parameter_count(cfg: ModelConfig, ep: int, pp: int, vpp: int, pp_rank: int) -> int:
    """Routed-expert parameters on one rank (reduced over expert-DP, not DP)."""
    from megatron_vpmoe.model.params import expert_params

    layers = rank_layers(cfg.num_layers, pp, vpp if pp > 1 else 1, pp_rank)
    return sum(cfg.num_moe_experts // ep * expert_params(cfg) for i in layers if cfg.is_moe_layer(i))


def largest_tensor(cfg: ModelConfig, tp: int, ep: int, pp: int, vpp: int, pp_rank: int) -> int:
    """Elements of the largest parameter tensor on the rank (a per-tensor optimizer's temporary)."""
    h = cfg.hidden_size
    up = 2 if cfg.activation == "swiglu" else 1
    sizes = [0]
    if pp_rank == 0 or (pp_rank == pp - 1 and cfg.untie_embeddings_and_output_weights):
        sizes.append(cfg.vocab_size * h)
    layers = rank_layers(cfg.num_layers, pp, vpp if pp > 1 else 1, pp_rank)
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels // tp * h
    sizes.append(qkv if layers else 0)
    if cfg.local_attention == "tpa" and layers:  # TPA's head-factor and dim-factor projections
        ranks = cfg.tpa_q_rank + 2 * cfg.tpa_kv_rank
        sizes += [cfg.num_attention_heads * ranks // tp * h, ranks * cfg.kv_channels * h]
    if any(not cfg.is_moe_layer(i) for i in layers):
        sizes.append(h * cfg.ffn_hidden_size * up // tp)
    if any(cfg.is_moe_layer(i) for i in layers):
        sizes.append(cfg.num_moe_experts // ep * h * cfg.moe_ffn_hidden_size * up)
    return max(sizes)


# -- activations ------------------------------------------------------------------------------------
def _norm_saved(rows: int, width: int, a: int, input_counted: bool, output_saved: bool,
                kernels: str = "reference") -> int:
    """RMSNorm of ``rows`` vectors. Reference (computed in fp32 by PyTorch ops): its fp32 input (a
    new copy unless it is an fp32 tensor already counted), ``x * rsqrt`` and ``rsqrt``; fused:
    the input (unless counted) and ``rsqrt``. Either way, if a linear consumes it, the output in
    the activation dtype."""
    n = rows * F32
    if kernels == "reference":
        n += rows * width * F32
        if a != F32 or not input_counted:
            n += rows * width * F32
    elif not input_counted:
        n += rows * width * a
    if output_saved:
        n += rows * width * a
    return n


def layer_activation_bytes(cfg: ModelConfig, layer: int, layout: Layout, seq: int, a: int,
                           kernels: str) -> Dict[str, int]:
    """Bytes autograd saves for one micro-batch through decoder layer ``layer``, by part."""
    b, s = layout.mb, seq
    t = b * s
    h, d = cfg.hidden_size, cfg.kv_channels
    nh, ng = cfg.num_attention_heads // layout.tp, cfg.num_query_groups // layout.tp
    qd, kvd = nh * d, ng * d
    qkvd = qd + 2 * kvd
    if cfg.attention_kind(layer) == "tpa":
        # approximate: the factor projections' outputs stand for the QKV output, and K/V are per
        # head (expanded from the factors), so they count like queries
        ranks = cfg.tpa_q_rank + 2 * cfg.tpa_kv_rank
        qkvd, kvd = ranks * (nh + d), qd
    grape = cfg.position_kind(layer) == "grape_m"  # RoPE's tables are shared by the chunk's layers
    rc = layout.recompute
    out: Dict[str, int] = {"layer_input": t * h * a}
    if rc == "full":  # only the layer's input is kept; the rest is recomputed in backward
        return out
    # attention block
    attn = _norm_saved(t, h, a, True, True, kernels) + t * qkvd * a
    if cfg.qk_layernorm:
        # q is a reshaped copy of its QKV slice; k a view of the QKV output (counted in fp32)
        attn += _norm_saved(t * nh, d, a, False, False, kernels) + _norm_saved(t * ng, d, a, True, False, kernels)
    if grape:
        attn += 4 * t * d * F32  # cos and sin, for q and for k
    if kernels == "reference":
        if rc == "selective":
            attn += t * (qd + kvd) * a + (t * kvd * a if cfg.value_residual and layer > 0 else 0)
        else:
            cols = s + (1 if cfg.softmax_offset else 0)
            attn += 3 * t * qd * F32  # q, k and v (GQA-repeated) as contiguous fp32 bmm operands
            attn += s * s  # the boolean mask
            attn += b * nh * s * cols * F32  # softmax probabilities
    else:  # fused attention keeps q, k, v, the output and the row log-sum-exp
        attn += t * (qd + kvd) * a + (t * kvd * a if cfg.value_residual and layer > 0 else 0)
        if rc != "selective":
            attn += t * nh * F32
    attn += t * qd * a  # the output projection's input
    out["attention"] = attn
    # MLP block
    mlp = t * h * a + _norm_saved(t, h, a, True, True, kernels)  # the residual after attention, the norm
    if cfg.is_moe_layer(layer):
        e, k = cfg.num_moe_experts, cfg.moe_router_topk
        tk = t * k
        groups = cfg.moe_router_num_groups
        router = t * e * F32 + t * k * I64 + t * k * F32  # scores, top-k indices, weights
        if groups > 1:
            router += t * groups * min(2, e // groups) * I64 + t * cfg.moe_router_group_topk * I64 + t * e
        if cfg.moe_router_score_function == "sigmoid" and k > 1:
            router += t * F32
        if a != F32:
            router += t * h * F32  # the router's fp32 copy of its input
        mlp += router
        f = cfg.moe_ffn_hidden_size
        routed = 3 * tk * h * a + tk * F32  # dispatched tokens, expert output, weighted output; weights
        if rc == "selective":
            routed += 2 * tk * I64 + e * I64
        else:
            routed += 3 * tk * I64 + 2 * e * 4 + 2 * tk * f * a  # + activation input/output inside the experts
        if a != F32 and rc != "selective":  # grouped_mm's bf16 copies of the expert weights, saved
            # per micro-batch (made inside the recomputed region under selective recompute)
            from megatron_vpmoe.model.params import expert_params
            routed += e // layout.ep * expert_params(cfg) * a
        mlp += routed
        if cfg.moe_shared_expert_intermediate_size > 0:
            fs = cfg.moe_shared_expert_intermediate_size // layout.tp
            mlp += cfg.moe_num_shared_experts * 2 * t * fs * a
    else:
        mlp += 2 * t * (cfg.ffn_hidden_size // layout.tp) * a
    out["mlp"] = mlp
    return out


def _layer_total(cfg: ModelConfig, layer: int, layout: Layout, seq: int, a: int, kernels: str) -> int:
    """Sum of :func:`layer_activation_bytes`, shared by layers of one kind (a search plans many)."""
    key = (id(cfg), cfg.is_moe_layer(layer), cfg.is_global_layer(layer), layer > 0, layout.tp, layout.ep,
           layout.mb, layout.recompute, seq, a, kernels)
    if key not in _LAYER_CACHE:
        if len(_LAYER_CACHE) > 4096:
            _LAYER_CACHE.clear()
        _LAYER_CACHE[key] = (cfg, sum(layer_activation_bytes(cfg, layer, layout, seq, a, kernels).values()))
    return _LAYER_CACHE[key][1]


_LAYER_CACHE: Dict[tuple, tuple] = {}  # values keep cfg alive, so its id is not reused while cached


def chunk_activation_bytes(cfg: ModelConfig, layout: Layout, seq: int, a: int, kernels: str,
                           layers: List[int], first: bool, last: bool, has_layer0: bool) -> int:
    """Saved bytes of one micro-batch through one model chunk (a pipeline stage's layers)."""
    t = layout.mb * seq
    n = sum(_layer_total(cfg, i, layout, seq, a, kernels) for i in layers)
    kvd = math.prod(first_values_shape(cfg, layout.tp))  # v_first per token
    qkvd = (cfg.num_attention_heads + 2 * cfg.num_query_groups) // layout.tp * cfg.kv_channels
    if cfg.value_residual and layers:
        if not has_layer0:
            n += t * kvd * a  # layer 0's values, received with the activations
        elif layout.recompute == "full":
            n += t * qkvd * a  # layer 0's values are a view of its QKV output, which stays alive
    if layout.recompute == "full":
        n += t * I64  # positions
    elif any(cfg.position_kind(i) == "rope" for i in layers):
        # cos and sin [B, S, 1, D] fp32, built once per forward (model/positions.py) and saved by
        # every RoPE layer's q and k rotations: one pair per chunk
        n += 2 * t * cfg.kv_channels * F32
    if first:
        n += t * I64  # token ids (embedding)
    if last:  # final norm of the last layer's output, labels
        n += _norm_saved(t, cfg.hidden_size, a, False, True, kernels) + t * I64
    return n


def in_flight(layout: Layout, global_batch: int, pp_rank: int) -> int:
    """Model-chunk micro-batches whose activations are alive at once on pipeline rank ``pp_rank``."""
    m = layout.micro_batches(global_batch)
    if layout.pp == 1:
        return 1
    if m < layout.pp:  # GPipe: every micro-batch's forward before any backward
        return m * layout.vpp
    if layout.vpp == 1:
        return min(m, layout.pp - pp_rank)
    # interleaved 1F1B (Megatron): warm-up chunks before the first backward, plus the one in flight
    return min(m * layout.vpp, (layout.pp - pp_rank - 1) * 2 + (layout.vpp - 1) * layout.pp + 1)


@dataclass
class RankMemory:
    """One pipeline rank's predicted memory (bytes) by component, and the moments it peaks."""

    pp_rank: int
    params: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    activations_per_microbatch: int
    in_flight: int
    working: int
    head_loss: int
    embedding_grad: int
    all_to_all: int
    pipeline_buffers: int
    optimizer_step: int
    grad_reduce: int
    checkpoint_staging: int
    autocast_weights: int
    framework: int
    moments: Dict[str, int] = field(default_factory=dict)

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def peak(self) -> int:
        return max(self.moments.values())

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)

    def components(self) -> Dict[str, int]:
        """Bytes by component (transients are alive only at their moment; see ``moments``)."""
        keys = ("parameters", "gradients", "optimizer", "activations", "working", "head_loss", "embedding_grad",
                "all_to_all", "pipeline_buffers", "optimizer_step", "grad_reduce", "checkpoint_staging",
                "autocast_weights", "framework")
        return {k: getattr(self, k) for k in keys}


def rank_memory(cfg, layout: Layout, pp_rank: int, kernels: str, framework_bytes: int = 0,
                staging_on_device: bool = False, foreach_optimizer: bool = False) -> RankMemory:
    """Predicted memory of one rank of pipeline rank ``pp_rank`` for run config ``cfg`` under ``layout``.

    A checkpoint save stages one copy of the rank's parameters and optimizer state (``async_save``
    copies them to CPU; a synchronous save's serialisation copies them too, as measured in
    ``benchmarks/plan.py``): in host memory, so it counts toward the device's peak only when the
    device is the host (``staging_on_device``, CPU runs). ``torch.optim.AdamW`` updates CUDA
    tensors with ``foreach`` kernels (temporaries the size of the rank's parameters) and CPU
    tensors one at a time (``foreach_optimizer`` False: the largest tensor)."""
    m = cfg.model
    seq, gbs = cfg.data.seq_length, cfg.train.global_batch_size
    a = act_bytes(cfg.train.precision)
    pp, vpp, tp, ep = layout.pp, layout.vpp if layout.pp > 1 else 1, layout.tp, layout.ep
    params = shard_parameter_count(m, tp=tp, ep=ep, pp=pp, vpp=vpp, pp_rank=pp_rank)
    tensors = shard_tensor_count(m, pp, vpp, pp_rank)
    experts = expert_parameter_count(m, ep, pp, vpp, pp_rank)
    dense = params - experts
    state = 2 * F32 * params
    if layout.zero:
        state = 2 * F32 * (dense / layout.dp + experts / max(layout.expert_dp, 1))
    optimizer = int(state) + F32 * tensors
    first, last = pp_rank == 0, pp_rank == pp - 1
    stages = rank_stages(pp, vpp, pp_rank)
    chunks = []
    for st in stages:
        layers = stage_layers(m.num_layers, pp * vpp, st)
        chunks.append(chunk_activation_bytes(m, layout, seq, a, kernels, layers, st == 0, st == pp * vpp - 1,
                                             0 in layers))
    per_mb = max(chunks)
    flight = in_flight(layout, gbs, pp_rank)
    activations = per_mb * flight if vpp == 1 else int(sum(chunks) / len(chunks) * flight)
    t = layout.mb * seq
    h = m.hidden_size
    # one layer's backward: the gradients of its saved activations; under recompute, the layer's
    # forward is replayed first (full: the whole layer, selective: its attention core and experts),
    # so its activations as without recompute exist again beside them
    layers = rank_layers(m.num_layers, pp, vpp, pp_rank)
    no_recompute = replace(layout, recompute="none")
    one_layer = max(_layer_total(m, i, layout, seq, a, kernels) for i in layers)
    replayed = max(_layer_total(m, i, no_recompute, seq, a, kernels) for i in layers)
    working = one_layer + (replayed if layout.recompute != "none" else 0)
    head_loss = 0
    if last:
        rows = min(t, LOSS_CHUNK)
        # one chunk's fp32 logits (softmax in place; a bf16 copy of it under bf16), the fp32 weight
        # gradient accumulator and the hidden gradient
        head_loss = rows * m.vocab_size * (F32 + (a if a != F32 else 0)) + m.vocab_size * h * F32 + 2 * t * h * F32
    embedding_grad = m.vocab_size * h * F32 if first else 0
    all_to_all = 2 * t * m.moe_router_topk * h * a if ep > 1 and m.num_moe_experts else 0
    pipeline_buffers = 0
    if pp > 1:
        kvd = math.prod(first_values_shape(m, tp))
        pipeline_buffers = 2 * vpp * t * (h + (kvd if m.value_residual else 0)) * a
    if foreach_optimizer:
        optimizer_step = F32 * (params if not layout.zero else int(dense / layout.dp + experts / max(layout.expert_dp, 1)))
    else:
        optimizer_step = F32 * largest_tensor(m, tp, ep, pp, vpp, pp_rank)
    # parameters whose gradients are reduced over a data-parallel group
    reduced = (dense if layout.dp > 1 else 0) + (experts if layout.expert_dp > 1 else 0)
    # overlapped (parallel/grad_sync.py): their gradients live in bucket buffers allocated once and
    # kept (no copy for the reduction); otherwise one flat copy of each group's gradients
    bucketed = reduced if layout.overlap or layout.zero else 0
    grad_reduce = 0 if layout.overlap or layout.zero else \
        F32 * max(dense if layout.dp > 1 else 0, experts if layout.expert_dp > 1 else 0)
    gradients = F32 * params
    bucket_held = F32 * bucketed  # gradient bytes the buckets hold when backward ends
    if layout.zero and reduced and layout.micro_batches(gbs) == 1:
        # ZeRO-2, one micro-batch: a rank keeps its reduce-scattered share; a bucket's full buffer
        # lives only while its reduce-scatter is in flight (IN_FLIGHT + the one filling; all
        # without overlap). Accumulating, the buffers are kept (reduced in place): as without ZeRO
        from megatron_vpmoe.parallel.grad_sync import IN_FLIGHT

        share = F32 * ((dense / layout.dp if layout.dp > 1 else 0)
                       + (experts / layout.expert_dp if layout.expert_dp > 1 else 0))
        full = F32 * reduced if not layout.overlap else \
            min(F32 * reduced, (IN_FLIGHT + 1) * int(cfg.parallel.bucket_mb * 2**20))
        gradients = int(F32 * (params - reduced) + share)
        bucket_held = int(share + full)
    staging = params * F32 + optimizer
    autocast_weights = (params - experts - (m.vocab_size * h if first else 0)) * 2 if a != F32 else 0
    base = F32 * params + gradients + optimizer + framework_bytes  # gradients are freed after each step's update
    mem = RankMemory(pp_rank=pp_rank, params=params, parameters=F32 * params, gradients=gradients,
                     optimizer=optimizer, activations=activations, activations_per_microbatch=per_mb,
                     in_flight=flight, working=working, head_loss=head_loss, embedding_grad=embedding_grad,
                     all_to_all=all_to_all, pipeline_buffers=pipeline_buffers, optimizer_step=optimizer_step,
                     grad_reduce=grad_reduce, checkpoint_staging=staging, autocast_weights=autocast_weights,
                     framework=framework_bytes)
    # Gradients are freed after every update, so they exist beside the peak of activations only if
    # a backward has run before that peak in the step: when more micro-batches pass through the
    # rank than are in flight (steady 1F1B, gradient accumulation). With every micro-batch in
    # flight at once (one micro-batch, GPipe) backward frees activations as it makes gradients.
    micro_chunks = layout.micro_batches(gbs) * vpp
    freed = F32 * (params - bucketed)  # gradients created by backward and freed after the update
    held = bucket_held + (activations + freed if micro_chunks > flight else max(activations, freed))
    transient = working + pipeline_buffers + all_to_all + autocast_weights + max(head_loss, embedding_grad)
    mem.moments = {
        "backward": base - gradients + held + transient,
        "grad_reduce": base + grad_reduce,
        "optimizer_step": base + optimizer_step,
        "checkpoint_save": base - freed + (staging if staging_on_device else 0),
    }
    return mem


def plan_memory(cfg, layout: Layout, kernels: str, framework_bytes: int = 0,
                staging_on_device: bool = False, foreach_optimizer: bool = False) -> List[RankMemory]:
    """Every pipeline rank's memory (ranks of one pipeline rank are alike up to routing balance)."""
    return [rank_memory(cfg, layout, r, kernels, framework_bytes, staging_on_device, foreach_optimizer)
            for r in range(layout.pp)]
