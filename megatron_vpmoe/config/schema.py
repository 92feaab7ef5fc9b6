"""The one configuration schema: typed dataclasses for every section of a run's YAML.

Sections: ``run``, ``model``, ``parallel``, ``data``, ``train``, ``checkpoint``, ``log``,
``distill``. Field names in ``model`` follow megatron-core's ``TransformerConfig`` where one
exists, so Megatron users recognise them. Loading and validation live in ``loader.py``; the
cross-field rules of each section live here, in its ``validate`` method, raising
:class:`ConfigError` with the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from megatron_vpmoe.config.ranges import check_ranges
from megatron_vpmoe.utils.errors import ConfigError


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    dir: str = "runs/default"  # run directory: checkpoints, logs, data cache, REQUEUE marker
    name: Optional[str] = None  # shown in logs and W&B; default: the config file name
    seed: int = 1234  # model init, data order and sampling


@dataclass
class ModelConfig:
    """The VPMoE architecture. Every size comes from here."""

    vocab_size: int = 201_088  # padded vocabulary (embedding rows and LM-head columns)
    hidden_size: int = 1024  # residual stream width
    num_layers: int = 80  # transformer blocks
    num_attention_heads: int = 8  # query heads
    num_query_groups: int = 2  # key/value heads (GQA)
    kv_channels: int = 128  # head dimension
    ffn_hidden_size: int = 4096  # the dense (non-MoE) layers' MLP width
    activation: Literal["squared_relu", "gelu", "swiglu"] = "squared_relu"  # MLP activation of dense layers and experts
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"  # pre-norm type
    norm_epsilon: float = 1e-5  # epsilon of every norm
    qk_layernorm: bool = True  # RMSNorm on queries and keys per head (before RoPE)
    add_bias_linear: bool = False  # biases on linear layers
    untie_embeddings_and_output_weights: bool = True  # separate input embedding and LM head
    init_method_std: float = 0.02  # std of the normal init of weight matrices

    # attention
    window_size: int = 128  # sliding window of local layers (tokens, including self)
    local_global_pattern: List[int] = field(default_factory=lambda: [3, 1])  # 3 local : 1 global
    softmax_offset: bool = True  # learnable per-head attention sink (GPT-OSS)
    value_residual: bool = True  # v = lambda * v + (1 - lambda) * v_layer1
    position_embedding_type: Literal["rope", "none"] = "rope"  # rope, or none (NoPE everywhere)
    rotary_base: float = 10_000.0  # RoPE base frequency
    nope_on_global: bool = False  # no positional encoding on global layers (the same as global_position: none)
    local_attention: Literal["gqa", "tpa"] = "gqa"  # sliding-window layers: GQA, or tensor product attention (TPA, arXiv 2501.06425)
    tpa_q_rank: int = 6  # TPA: rank of the query tensor products (the paper's R_Q)
    tpa_kv_rank: int = 2  # TPA: rank of the key and of the value tensor products (the paper's R_K = R_V)
    local_position: Literal["rope", "grape_m"] = "rope"  # sliding-window layers: RoPE, or GRAPE-M rotations (arXiv 2512.07805)
    grape_m_learnable_freq: bool = True  # GRAPE-M: learn the per-plane frequencies (initialised at the RoPE spectrum)
    grape_m_learnable_basis: bool = False  # GRAPE-M: learn the orthogonal basis of the rotation planes (initialised at RoPE's planes)
    global_position: Literal["rope", "none", "alibi"] = "rope"  # global layers: RoPE, none (NoPE), or ALiBi (GRAPE-A)
    attention_dropout: float = 0.0  # must be 0 (the fused attention path has no dropout)
    hidden_dropout: float = 0.0  # dropout on the residual branches (training only)

    # mixture of experts
    moe_first_k_dense: int = 1  # leading layers with a dense MLP instead of MoE
    num_moe_experts: int = 256  # routed experts per MoE layer; 0 = dense model
    moe_router_topk: int = 4  # experts per token
    moe_ffn_hidden_size: int = 128  # routed expert MLP width
    moe_shared_expert_intermediate_size: int = 512  # 0 disables the shared expert
    moe_num_shared_experts: int = 1  # always-on shared experts per MoE layer
    moe_router_score_function: Literal["sigmoid", "softmax"] = "sigmoid"  # router scores (sigmoid as DeepSeek-V3)
    moe_router_num_groups: int = 8  # expert groups for group-limited routing
    moe_router_group_topk: int = 4  # groups a token may route into
    moe_router_topk_scaling_factor: float = 2.5  # multiplies the normalised routing weights
    moe_router_enable_expert_bias: bool = True  # aux-loss-free balancing
    moe_router_bias_update_rate: float = 1e-3  # step of the load-balancing expert-bias update
    moe_aux_loss_coeff: float = 0.0  # sequence-level auxiliary loss; 0 disables it

    def is_moe_layer(self, layer_number: int) -> bool:
        """0-based ``layer_number``: the first ``moe_first_k_dense`` layers are dense."""
        return self.num_moe_experts > 0 and layer_number >= self.moe_first_k_dense

    def is_global_layer(self, layer_number: int) -> bool:
        """Local:global schedule; with [3, 1] layers 3, 7, 11, ... are global (full causal)."""
        local, glob = self.local_global_pattern
        period = local + glob
        return glob > 0 and (layer_number % period) >= local

    def attention_kind(self, layer_number: int) -> str:
        """``tpa`` or ``gqa``: global layers are always GQA, local ones follow ``local_attention``."""
        return "gqa" if self.is_global_layer(layer_number) else self.local_attention

    def position_kind(self, layer_number: int) -> str:
        """The layer's positions: ``rope``, ``grape_m``, ``alibi`` or ``none``."""
        if self.position_embedding_type == "none":
            return "none"
        if self.is_global_layer(layer_number):
            return "none" if self.nope_on_global else self.global_position
        return self.local_position

    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "num_layers", "num_attention_heads",
            "num_query_groups", "kv_channels", "ffn_hidden_size", "window_size",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be > 0, got {getattr(self, name)}", key=f"model.{name}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_query_groups ({self.num_query_groups})",
                key="model.num_query_groups",
            )
        if len(self.local_global_pattern) != 2 or min(self.local_global_pattern) < 0 or sum(
            self.local_global_pattern
        ) == 0:
            raise ConfigError(
                f"must be [num_local, num_global] with non-negative entries, got {self.local_global_pattern}",
                key="model.local_global_pattern",
            )
        if self.position_embedding_type == "rope" and self.kv_channels % 2:
            raise ConfigError("RoPE needs an even head dimension", key="model.kv_channels")
        if self.position_embedding_type == "none" and (
                self.local_position != "rope" or self.global_position != "rope"):
            raise ConfigError("position_embedding_type: none turns positions off everywhere; leave "
                              "local_position/global_position at rope", key="model.position_embedding_type")
        if self.nope_on_global and self.global_position != "rope":
            raise ConfigError(f"nope_on_global contradicts global_position: {self.global_position} "
                              "(use global_position: none)", key="model.nope_on_global")
        if self.local_attention == "tpa":
            for name in ("tpa_q_rank", "tpa_kv_rank"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"must be > 0, got {getattr(self, name)}", key=f"model.{name}")
        if not 0 <= self.moe_first_k_dense <= self.num_layers:
            raise ConfigError(
                f"must be between 0 and num_layers ({self.num_layers})", key="model.moe_first_k_dense"
            )
        if self.num_moe_experts < 0:
            raise ConfigError("must be >= 0 (0 = dense model)", key="model.num_moe_experts")
        if self.num_moe_experts > 0:
            e = self.num_moe_experts
            if not 1 <= self.moe_router_topk <= e:
                raise ConfigError(
                    f"must be between 1 and num_moe_experts ({e})", key="model.moe_router_topk"
                )
            if self.moe_ffn_hidden_size <= 0:
                raise ConfigError("must be > 0", key="model.moe_ffn_hidden_size")
            groups = self.moe_router_num_groups
            if groups < 1 or e % groups:
                raise ConfigError(
                    f"num_moe_experts ({e}) must be divisible by moe_router_num_groups ({groups})",
                    key="model.moe_router_num_groups",
                )
            if not 1 <= self.moe_router_group_topk <= groups:
                raise ConfigError(
                    f"must be between 1 and moe_router_num_groups ({groups})",
                    key="model.moe_router_group_topk",
                )
            if self.moe_router_topk > self.moe_router_group_topk * (e // groups):
                raise ConfigError(
                    f"moe_router_topk ({self.moe_router_topk}) exceeds the experts reachable in "
                    f"{self.moe_router_group_topk} groups of {e // groups}",
                    key="model.moe_router_topk",
                )
            if self.moe_shared_expert_intermediate_size < 0:
                raise ConfigError("must be >= 0", key="model.moe_shared_expert_intermediate_size")


@dataclass
class ParallelConfig:
    """Parallel layout. ``data`` = 0 means: whatever the world size leaves."""

    tensor: int = 1  # tensor-parallel size (heads and MLP split)
    expert: int = 1  # expert-parallel size (routed experts sharded, all-to-all dispatch)
    pipeline: int = 1  # pipeline-parallel stages (layers split)
    virtual_pipeline: int = 1  # model chunks per pipeline rank; > 1 runs interleaved 1F1B
    data: int = 0  # data-parallel size; 0 = world size / (tensor x pipeline)
    sequence_parallel: bool = False  # TP > 1: norms, residual stream and dropout split along the sequence over the TP group
    overlap_grad_reduce: bool = True  # data-parallel gradient all-reduce in buckets launched during backward (False: one reduction after it)
    bucket_mb: float = 25.0  # size bound of one gradient-reduction bucket (MB of gradients)
    distributed_optimizer: bool = False  # ZeRO-2: AdamW state and reduced gradients sharded over data-parallel ranks (same updates, same checkpoints)

    def validate(self, model: ModelConfig) -> None:
        for name in ("tensor", "expert", "pipeline"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", key=f"parallel.{name}")
        if self.data < 0:
            raise ConfigError("must be >= 0 (0 = derived from the world size)", key="parallel.data")
        tp = self.tensor
        if model.num_attention_heads % tp:
            raise ConfigError(
                f"model.num_attention_heads ({model.num_attention_heads}) is not divisible by "
                f"the tensor-parallel size ({tp})",
                key="parallel.tensor",
            )
        if model.num_query_groups % tp:
            raise ConfigError(
                f"model.num_query_groups ({model.num_query_groups}) is not divisible by "
                f"the tensor-parallel size ({tp})",
                key="parallel.tensor",
            )
        if model.ffn_hidden_size % tp:
            raise ConfigError(
                f"model.ffn_hidden_size ({model.ffn_hidden_size}) is not divisible by "
                f"the tensor-parallel size ({tp})",
                key="parallel.tensor",
            )
        if model.moe_shared_expert_intermediate_size % tp:
            raise ConfigError(
                f"model.moe_shared_expert_intermediate_size ({model.moe_shared_expert_intermediate_size}) "
                f"is not divisible by the tensor-parallel size ({tp})",
                key="parallel.tensor",
            )
        if self.expert > 1 and model.num_moe_experts == 0:
            raise ConfigError("expert parallelism needs a MoE model (model.num_moe_experts > 0)",
                              key="parallel.expert")
        if model.num_moe_experts and model.num_moe_experts % self.expert:
            raise ConfigError(
                f"model.num_moe_experts ({model.num_moe_experts}) is not divisible by "
                f"the expert-parallel size ({self.expert})",
                key="parallel.expert",
            )
        if self.pipeline > model.num_layers:
            raise ConfigError(
                f"pipeline size ({self.pipeline}) exceeds model.num_layers ({model.num_layers})",
                key="parallel.pipeline",
            )
        if self.virtual_pipeline < 1:
            raise ConfigError(f"must be >= 1, got {self.virtual_pipeline}", key="parallel.virtual_pipeline")
        if self.virtual_pipeline > 1 and self.pipeline == 1:
            raise ConfigError("a virtual pipeline needs parallel.pipeline > 1",
                              key="parallel.virtual_pipeline")
        if self.pipeline * self.virtual_pipeline > model.num_layers:
            raise ConfigError(
                f"pipeline x virtual_pipeline ({self.pipeline * self.virtual_pipeline}) exceeds "
                f"model.num_layers ({model.num_layers}): every model chunk needs a layer",
                key="parallel.virtual_pipeline")
        if self.sequence_parallel and tp == 1:
            raise ConfigError("sequence parallelism splits the sequence over the tensor-parallel "
                              "group: it needs parallel.tensor > 1", key="parallel.sequence_parallel")

    def resolve_data(self, world_size: int) -> int:
        """Data-parallel size for ``world_size`` ranks; raises if the layout does not fit."""
        model_parallel = self.tensor * self.pipeline
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor x pipeline = {model_parallel}",
                key="parallel",
            )
        data = world_size // model_parallel
        if self.data and self.data != data:
            raise ConfigError(
                f"parallel.data = {self.data} but world size {world_size} / (tensor x pipeline) = {data}",
                key="parallel.data",
            )
        if (data * self.tensor) % self.expert:
            raise ConfigError(
                f"expert size ({self.expert}) must divide data x tensor ({data * self.tensor})",
                key="parallel.expert",
            )
        return data


@dataclass
class DataConfig:
    """Training data: a weighted blend of Megatron indexed-dataset prefixes."""

    tokenizer: Optional[str] = None  # a tokenizer directory (vpmoe tokenizer train/get)
    blend: List[List[object]] = field(default_factory=list)  # [[weight, prefix], ...]
    split: str = "98,1,1"  # train,valid,test
    seq_length: int = 1024  # tokens per training sample
    mock: bool = False  # random tokens instead of shards (smoke tests only)
    cache_dir: Optional[str] = None  # megatron-core index cache; default {run.dir}/data_cache
    num_workers: int = 0  # DataLoader read-ahead workers per rank

    def validate(self) -> None:
        if self.seq_length <= 0:
            raise ConfigError("must be > 0", key="data.seq_length")
        for i, entry in enumerate(self.blend):
            if (
                not isinstance(entry, (list, tuple))
                or len(entry) != 2
                or isinstance(entry[0], bool)
                or not isinstance(entry[0], (int, float))
                or not isinstance(entry[1], str)
            ):
                raise ConfigError(
                    f"each entry must be [weight, prefix], got {entry!r}", key=f"data.blend[{i}]"
                )
            if entry[0] < 0:
                raise ConfigError("weight must be >= 0", key=f"data.blend[{i}]")
        try:
            parts = [float(p) for p in self.split.split(",")]
        except ValueError:
            parts = []
        if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
            raise ConfigError(f"must be 'train,valid,test' weights, got {self.split!r}", key="data.split")
        if not self.blend and not self.mock:
            raise ConfigError("give data.blend (shard prefixes) or set data.mock: true", key="data.blend")


@dataclass
class OptimizerConfig:
    """AdamW hyper-parameters, weight-decay groups and gradient clipping."""

    name: Literal["adamw"] = "adamw"  # AdamW with decoupled weight decay
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # floor of the cosine / WSD decay
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices
    decay_norms_and_biases: bool = False  # also decay norm weights and biases
    decay_embeddings: bool = False  # also decay the embedding and LM head
    embedding_lr_mult: float = 1.0  # LR multiplier of the embedding (and LM head)
    clip_grad: float = 1.0  # 0 disables clipping


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine, warmup-stable-decay or constant."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"  # cosine, wsd (warmup-stable-decay) or constant after warmup
    warmup_steps: int = 0  # linear warmup from 0
    wsd_decay_fraction: float = 0.1  # WSD: last fraction of the steps decays to min_lr


@dataclass
class TrainConfig:
    """The training loop: steps, batch sizes, precision, linear-layer implementation, validation and guards."""

    steps: int = 1000  # optimizer steps
    global_batch_size: int = 8  # samples per step over all data-parallel ranks
    micro_batch_size: int = 1  # samples per forward; accumulation = global / (micro x DP)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    master_weights: bool = True  # under bf16: forward/backward on bf16 weights cast once per step from fp32 master weights, fp32 gradient buffers; false: autocast casts the fp32 weights at every use (the old path)
    transformer_impl: Literal["local", "transformer_engine"] = "local"  # linears: megatron-core/PyTorch, or Transformer Engine (GPU host with TE; not yet run on a GPU here)
    recompute: Literal["none", "selective", "full"] = "none"  # activation recompute in backward: selective = attention core + routed experts' MLP, full = whole layers
    fp8: Optional[Literal["delayed", "current", "mxfp8"]] = None  # FP8 recipe for the TE linears; needs transformer_impl: transformer_engine
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # see train.optimizer.*
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # see train.schedule.*
    eval_interval: int = 0  # 0 disables validation
    eval_iters: int = 10  # validation batches per evaluation
    max_nonfinite_steps: int = 5  # this many non-finite steps in a row stop the run

    def validate(self) -> None:
        if self.fp8 is not None and self.transformer_impl != "transformer_engine":
            raise ConfigError("FP8 runs in Transformer Engine linears; set train.transformer_impl: "
                              "transformer_engine", key="train.fp8")
        for name in ("steps", "global_batch_size", "micro_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be > 0, got {getattr(self, name)}", key=f"train.{name}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})",
                key="train.global_batch_size",
            )
        if self.optimizer.lr <= 0:
            raise ConfigError("must be > 0", key="train.optimizer.lr")
        if self.optimizer.min_lr > self.optimizer.lr:
            raise ConfigError("must be <= train.optimizer.lr", key="train.optimizer.min_lr")
        if self.schedule.warmup_steps < 0 or self.schedule.warmup_steps > self.steps:
            raise ConfigError("must be between 0 and train.steps", key="train.schedule.warmup_steps")
        if not 0.0 <= self.schedule.wsd_decay_fraction <= 1.0:
            raise ConfigError("must be between 0 and 1", key="train.schedule.wsd_decay_fraction")

    def check_batch_layout(self, data_parallel: int) -> int:
        """Gradient-accumulation steps for ``data_parallel`` replicas."""
        per_step = self.micro_batch_size * data_parallel
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size ({self.global_batch_size}) is not divisible by "
                f"micro_batch_size x data-parallel size ({per_step})",
                key="train.global_batch_size",
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written, how many are kept, and what a run loads."""

    dir: Optional[str] = None  # default {run.dir}/checkpoints
    interval: int = 0  # steps between saves; 0 = only at the end / on preemption
    keep_last: int = 3  # older checkpoints are deleted; 0 keeps all
    async_save: bool = False  # stage into reused CPU buffers, write in a background thread
    load: Optional[str] = "auto"  # "auto" = newest intact checkpoint under dir if any; a path; null = never
    load_optimizer: bool = True  # false: load weights only and start a fresh run


@dataclass
class LogConfig:
    """Metrics and progress output: the JSON-lines interval, progress bar, TensorBoard, W&B."""

    interval: int = 1  # steps between metric lines
    progress_bar: bool = True  # tqdm bar on rank 0 when stderr is a terminal; plain step lines otherwise
    tensorboard: bool = False  # TensorBoard scalars under {run.dir}/tensorboard
    wandb_project: Optional[str] = None  # log to Weights & Biases (needs pip install wandb)
    memory_report: bool = False  # every rank writes {run.dir}/memory/rank_N.json: measured peak RSS per phase (construction, steps, saves) beside its shard's bytes
    profile_steps: List[int] = field(default_factory=list)  # [first, last]: torch.profiler over those steps (1-based); every rank writes {run.dir}/profile/rank_N.{txt,json}

    def validate(self, steps: int) -> None:
        p = self.profile_steps
        if p and (len(p) != 2 or not 1 <= p[0] <= p[1] <= steps):
            raise ConfigError(f"expected [first, last] with 1 <= first <= last <= train.steps ({steps}), got {p}",
                              key="log.profile_steps")


@dataclass
class ScorerConfig:
    """One string-level teacher scorer of on-policy distillation and its weight."""

    kind: Literal["loglik", "rank", "critique", "verify"] = "loglik"  # loglik, rank, critique or verify (see docs)
    weight: float = 1.0  # weight in the combined teacher score


@dataclass
class OnPolicyConfig:
    """Phase 2, on-policy distillation: rollouts, teacher scoring and the GRPO-style update."""

    prompts: List[str] = field(default_factory=list)  # prompt files (jsonl: prompt / messages / question)
    samples_per_prompt: int = 4  # k rollouts per prompt (the GRPO group)
    prompts_per_step: int = 4  # prompts per optimizer step
    max_new_tokens: int = 64  # rollout length cap
    temperature: float = 1.0  # rollout sampling temperature
    top_p: float = 1.0  # rollout nucleus sampling
    clip_eps: float = 0.2  # PPO ratio clip
    ppo_epochs: int = 2  # policy-gradient passes over each step's rollouts (old log-probs fixed)
    teacher_prompt: Literal["harmony", "plain"] = "harmony"  # how the loglik scorer shows the prompt
    teacher_tokenizer: Optional[str] = None  # the teacher's HF tokenizer dir for loglik token ids (default: o200k Harmony)
    kl_coeff: float = 0.05  # KL penalty to the frozen reference
    nll_anchor_coeff: float = 0.0  # weight of the NLL anchor on data.blend; 0 disables it
    reference: Optional[str] = None  # frozen reference checkpoint (the phase-1 student)
    scorers: List[ScorerConfig] = field(default_factory=lambda: [ScorerConfig()])  # list of {kind, weight}
    sample_table_interval: int = 10  # steps between logged sample tables
    teacher_timeout_s: float = 60.0  # per-request timeout
    teacher_retries: int = 3  # retries before a sample is dropped from its group


@dataclass
class DistillConfig:
    """Distillation: the teacher server and the weights of the reasoning and final spans."""

    teacher_url: Optional[str] = None  # OpenAI-compatible teacher server (vpmoe serve, vLLM, SGLang)
    reasoning_loss_weight: float = 1.0  # span-normalised NLL on the reasoning channel
    final_loss_weight: float = 1.0  # span-normalised NLL on the final channel
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)  # see distill.onpolicy.*


@dataclass
class VpmoeConfig:
    """A whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> None:
        check_ranges(self)  # finite, in-range numbers first: the rules below may size things from them
        self.model.validate()
        self.parallel.validate(self.model)
        self.data.validate()
        self.train.validate()
        self.log.validate(self.train.steps)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run.dir}/checkpoints"
