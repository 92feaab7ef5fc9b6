"""Every Triton kernel compiles to a CUDA binary (sm_90; sm_80 in the long run) — no GPU needed.

The Triton interpreter used by the numerical tests does not type-check like the compiler
(loop-carried types, ``tl.dot`` shapes and dtypes, int64 offsets); this runs the real
compiler front to back (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for the
fp32 and bf16 variants the dispatch launches.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs the Triton compiler, not the interpreter", allow_module_level=True)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_vpmoe.kernels import (triton_activation, triton_attention, triton_dispatch, triton_loss,  # noqa: E402
                     triton_norm, triton_router)

FLOAT_ARGS = {"eps", "scale", "scaling"}


def _source(kernel, pointer_types: dict, constexprs: dict, default_pointer: str) -> ASTSource:
    """Signature from the parameter names: ``*_ptr`` pointers (``default_pointer`` unless named in
    ``pointer_types``), ``eps``/``scale``/``scaling`` fp32, other runtime scalars i32."""
    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, default_pointer)
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    assert not missing, missing
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs)


def _attention_constexprs(dtype_name):
    fp32 = dtype_name == "fp32"
    return dict(D=64, BLOCK_D=64, BLOCK_M=triton_attention.BLOCK_M, BLOCK_N=triton_attention.BLOCK_N,
                PRECISION="ieee" if fp32 else "tf32", DOT_DTYPE=tl.float32 if fp32 else tl.bfloat16)


def _cases(t):  # t: "fp32" or "bf16", the activations' dtype
    f32 = "*fp32"
    yield triton_activation._squared_relu_fwd, {}, dict(BLOCK=triton_activation.BLOCK)
    yield triton_activation._squared_relu_bwd, {}, dict(BLOCK=triton_activation.BLOCK)
    yield triton_norm._rms_norm_fwd, {"w_ptr": f32, "rstd_ptr": f32}, dict(BLOCK_N=1024)
    yield triton_norm._rms_norm_bwd, {"w_ptr": f32, "rstd_ptr": f32, "dw_partial_ptr": f32}, dict(BLOCK_N=1024)
    yield triton_router._route_fwd, {"logits_ptr": f32, "bias_ptr": f32, "scores_ptr": f32,
                                     "weights_ptr": f32, "indices_ptr": "*i64"}, \
        dict(HAS_BIAS=True, SOFTMAX=False, NORMALISE=True, TOPK=4, NUM_GROUPS=8, GROUP_TOPK=4,
             PER_GROUP=16, BLOCK_T=16, BLOCK_E=128, BLOCK_K=4, BLOCK_G=8)
    yield triton_dispatch._gather_rows, {"row_ptr": "*i64"}, dict(ROW_DIV=4, BLOCK_H=triton_dispatch.BLOCK_H)
    yield triton_dispatch._weighted_sum_rows, {"inv_ptr": "*i64", "w_ptr": f32}, \
        dict(TOPK=4, HAS_WEIGHT=True, BLOCK_H=triton_dispatch.BLOCK_H)
    yield triton_dispatch._unpermute_bwd, {"order_ptr": "*i64", "w_ptr": f32, "dw_ptr": f32}, \
        dict(TOPK=4, BLOCK_H=triton_dispatch.BLOCK_H)
    loss_ptrs = {"logits_ptr": f32, "labels_ptr": "*i64", "loss_ptr": f32, "lse_ptr": f32,
                 "grad_loss_ptr": f32}
    yield triton_loss._ce_fwd, loss_ptrs, dict(BLOCK_V=triton_loss.BLOCK_V)
    yield triton_loss._ce_bwd_inplace, loss_ptrs, dict(BLOCK_V=triton_loss.BLOCK_V)
    stats = {"sink_ptr": f32, "slope_ptr": f32, "lse_ptr": f32, "delta_ptr": f32}
    yield triton_attention._attn_fwd, stats, dict(HAS_SINK=True, **_attention_constexprs(t))
    yield triton_attention._attn_bwd_dkdv, stats, _attention_constexprs(t)
    yield triton_attention._attn_bwd_dq, stats, _attention_constexprs(t)


@pytest.mark.parametrize("arch", [90, pytest.param(80, marks=pytest.mark.long)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_to_cubin(arch, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    compiled = []
    for kernel, pointers, constexprs in _cases(dtype):
        binary = triton.compile(_source(kernel, pointers, constexprs, f"*{dtype}"),
                                target=GPUTarget("cuda", arch, 32))
        assert binary.asm["cubin"], kernel.__name__
        compiled.append(kernel.__name__)
    assert len(compiled) == 13
