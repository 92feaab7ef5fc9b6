"""RoPE's cos/sin tables are built once per positions tensor (every layer's queries and keys of a
forward share them) and rebuilt when the positions, head dim, base or the tensor's values change."""

from __future__ import annotations

import torch

from megatron_vpmoe.model import positions as pos


TABLES = pos._tables


def _fresh(x, positions, base):
    """The rotation with tables built now (not counted, not cached)."""
    return pos._rotate_with(x, *TABLES(positions, pos.rope_frequencies(x.shape[-1], base)))


def test_tables_shared_within_a_forward_and_rebuilt_on_change():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8)
    positions = torch.arange(6).expand(2, 6)
    built = []
    pos._tables = lambda p, f: built.append(1) or TABLES(p, f)
    try:
        for x in (q, k, q, k):  # two layers' queries and keys
            assert torch.equal(pos.apply_rope(x, positions, 10_000.0), _fresh(x, positions, 10_000.0))
        assert len(built) == 1
        pos.apply_rope(q, positions, 500.0)  # another base
        pos.apply_rope(torch.randn(2, 6, 4, 16), positions, 500.0)  # another head dim
        assert len(built) == 3
        other = torch.arange(3, 9).expand(2, 6)  # another forward's positions
        assert torch.equal(pos.apply_rope(q, other, 500.0), _fresh(q, other, 500.0))
        assert len(built) == 4
        own = torch.arange(6).repeat(2, 1)
        pos.apply_rope(q, own, 500.0)
        own.add_(5)  # changed in place: same storage, new version
        assert torch.equal(pos.apply_rope(q, own, 500.0), _fresh(q, own, 500.0))
        assert len(built) == 6
    finally:
        pos._tables = TABLES


def test_rope_gradient_flows_through_cached_tables():
    positions = torch.arange(5).unsqueeze(0)
    x = torch.randn(1, 5, 2, 4, requires_grad=True)
    for _ in range(2):  # the second call reuses the tables; backward works both times
        pos.apply_rope(x, positions, 10_000.0).square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    _fresh(ref, positions, 10_000.0).square().sum().backward()
    assert torch.allclose(x.grad, 2 * ref.grad)
