"""Hugging Face configuration of VPMoE (remote code; self-contained, no megatron_vpmoe import).

Field names are those of ``megatron_vpmoe.config.schema.ModelConfig``; the usual Hugging Face
names (``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``, ``sliding_window``,
``rms_norm_eps``) are aliases of them, and ``layer_types`` tells the KV cache which layers
use the sliding window.
"""

from transformers import PretrainedConfig


class VpmoeConfig(PretrainedConfig):
    model_type = "vpmoe"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_key_value_heads": "num_query_groups",
        "head_dim": "kv_channels",
        "sliding_window": "window_size",
        "rms_norm_eps": "norm_epsilon",
        "rope_theta": "rotary_base",
    }

    def __init__(
        self,
        vocab_size=201088,
        hidden_size=1024,
        num_layers=80,
        num_attention_heads=8,
        num_query_groups=2,
        kv_channels=128,
        ffn_hidden_size=4096,
        activation="squared_relu",
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        qk_layernorm=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        init_method_std=0.02,
        window_size=128,
        local_global_pattern=(3, 1),
        softmax_offset=True,
        value_residual=True,
        position_embedding_type="rope",
        rotary_base=10000.0,
        nope_on_global=False,
        local_attention="gqa",
        tpa_q_rank=6,
        tpa_kv_rank=2,
        local_position="rope",
        grape_m_learnable_freq=True,
        grape_m_learnable_basis=False,
        global_position="rope",
        moe_first_k_dense=1,
        num_moe_experts=256,
        moe_router_topk=4,
        moe_ffn_hidden_size=128,
        moe_shared_expert_intermediate_size=512,
        moe_num_shared_experts=1,
        moe_router_score_function="sigmoid",
        moe_router_num_groups=8,
        moe_router_group_topk=4,
        moe_router_topk_scaling_factor=2.5,
        moe_router_enable_expert_bias=True,
        max_position_embeddings=4096,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.num_query_groups = num_query_groups
        self.kv_channels = kv_channels
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        self.normalization = normalization
        self.norm_epsilon = norm_epsilon
        self.qk_layernorm = qk_layernorm
        self.add_bias_linear = add_bias_linear
        self.untie_embeddings_and_output_weights = untie_embeddings_and_output_weights
        self.init_method_std = init_method_std
        self.window_size = window_size
        self.local_global_pattern = list(local_global_pattern)
        self.softmax_offset = softmax_offset
        self.value_residual = value_residual
        self.position_embedding_type = position_embedding_type
        self.rotary_base = rotary_base
        self.nope_on_global = nope_on_global
        self.local_attention = local_attention
        self.tpa_q_rank = tpa_q_rank
        self.tpa_kv_rank = tpa_kv_rank
        self.local_position = local_position
        self.grape_m_learnable_freq = grape_m_learnable_freq
        self.grape_m_learnable_basis = grape_m_learnable_basis
        self.global_position = global_position
        self.moe_first_k_dense = moe_first_k_dense
        self.num_moe_experts = num_moe_experts
        self.moe_router_topk = moe_router_topk
        self.moe_ffn_hidden_size = moe_ffn_hidden_size
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        self.moe_num_shared_experts = moe_num_shared_experts
        self.moe_router_score_function = moe_router_score_function
        self.moe_router_num_groups = moe_router_num_groups
        self.moe_router_group_topk = moe_router_group_topk
        self.moe_router_topk_scaling_factor = moe_router_topk_scaling_factor
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.max_position_embeddings = max_position_embeddings
        self.layer_types = [
            "full_attention" if self.is_global_layer(i) else "sliding_attention" for i in range(num_layers)
        ]
        kwargs.pop("layer_types", None)
        kwargs.setdefault("tie_word_embeddings", not untie_embeddings_and_output_weights)
        super().__init__(**kwargs)

    def is_global_layer(self, layer_number):
        local, glob = self.local_global_pattern
        return glob > 0 and (layer_number % (local + glob)) >= local

    def attention_kind(self, layer_number):
        return "gqa" if self.is_global_layer(layer_number) else self.local_attention

    def position_kind(self, layer_number):
        if self.position_embedding_type == "none":
            return "none"
        if self.is_global_layer(layer_number):
            return "none" if self.nope_on_global else self.global_position
        return self.local_position

    def is_moe_layer(self, layer_number):
        return self.num_moe_experts > 0 and layer_number >= self.moe_first_k_dense
