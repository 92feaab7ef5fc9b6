"""Triton linear + cross-entropy for the LM head, semantics of ``kernels.reference.linear_cross_entropy``.

Chunked: the tokens are processed ``chunk_size`` rows at a time; each chunk's logits
``[chunk, V]`` come from one PyTorch matmul (cuBLAS on GPU), then Triton kernels stream over the
vocabulary in blocks with an online softmax. The full ``[N, V]`` logits never exist.
- forward kernel: per row, running max / sum-exp over vocabulary blocks -> ``lse``, loss
  ``lse - logit[label]`` (0 where ignored); ``lse`` is saved.
- backward: the chunk's logits are recomputed and a kernel overwrites them in place with
  ``(softmax - onehot(label)) * grad_loss * valid`` (using the saved ``lse``, one pass); then
  ``grad_hidden = g @ W`` and ``grad_W += g.T @ h`` (fp32 accumulation).
As in the reference, the matmuls run in ``hidden``'s dtype whatever autocast says (bf16
activations: bf16 GEMMs; the logits are upcast to fp32 before the kernels), so forward ``lse``
and backward logits agree.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024


@triton.jit
def _ce_fwd(logits_ptr, labels_ptr, loss_ptr, lse_ptr, n_vocab, ignore_index,
            BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * n_vocab
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))


@triton.jit
def _ce_bwd_inplace(logits_ptr, labels_ptr, lse_ptr, grad_loss_ptr, n_vocab, ignore_index,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * n_vocab
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    scale = tl.where(valid, tl.load(grad_loss_ptr + row).to(tl.float32), 0.0)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_vocab
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(base + cols, g * scale, mask=mask)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size):
        n, vocab = hidden.shape[0], weight.shape[0]
        labels = labels.contiguous()
        losses = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        w = weight.to(hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # GEMM in hidden's dtype, as in backward
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                logits = (hidden[start:end] @ w.t()).float().contiguous()
                _ce_fwd[(end - start,)](logits, labels[start:end], losses[start:end],
                                        lse[start:end], vocab, ignore_index, BLOCK_V=BLOCK_V)
                del logits  # free this chunk before the next one is computed
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels, lse = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_losses = grad_losses.float().contiguous()
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, ctx.chunk_size):
                end = min(start + ctx.chunk_size, n)
                h = hidden[start:end]
                g = (h @ w.t()).float().contiguous()
                _ce_bwd_inplace[(end - start,)](g, labels[start:end], lse[start:end],
                                                grad_losses[start:end], vocab, ctx.ignore_index,
                                                BLOCK_V=BLOCK_V)
                g = g.to(hidden.dtype)  # the logits' gradient feeds GEMMs in hidden's dtype
                grad_hidden[start:end] = g @ w
                if g.dtype == grad_weight.dtype:
                    grad_weight.addmm_(g.t(), h)
                else:  # accumulated over chunks in fp32
                    grad_weight += (g.t() @ h).float()
                del g
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=1024):
    """Per-token CE of ``hidden @ weight.T`` against ``labels`` (fp32 ``[N]``), logits never materialised."""
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_size)
