"""parallel.collectives: the flat collectives work under the new (torch 2.13) and the older names."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_vpmoe.parallel import collectives


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("older_torch", [False, True])
def test_flat_collectives_with_either_name(one_rank_group, monkeypatch, older_torch):
    calls = []
    for new, old in (("all_gather_single", "all_gather_into_tensor"), ("reduce_scatter_single", "reduce_scatter_tensor")):
        if older_torch:
            monkeypatch.delattr(dist, new, raising=False)  # torch < 2.13 has only the old name
        name = old if older_torch else new
        original = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    out = torch.zeros(3)
    collectives.all_gather_single(out, torch.tensor([1.0, 2.0, 3.0]))
    assert out.tolist() == [1.0, 2.0, 3.0]
    work = collectives.reduce_scatter_single(out, torch.tensor([4.0, 5.0, 6.0]), async_op=True)
    work.wait()
    assert out.tolist() == [4.0, 5.0, 6.0]
    assert calls == (["all_gather_into_tensor", "reduce_scatter_tensor"] if older_torch
                     else ["all_gather_single", "reduce_scatter_single"])


def test_differentiable_all_to_all_without_the_deprecated_api(one_rank_group):
    import warnings

    x = torch.arange(6.0).view(3, 2).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.distributed.nn.functional's FutureWarning would raise
        out = collectives.all_to_all_single(x.new_empty(3, 2), x * 2, [3], [3])
        (out * torch.tensor([[1.0, 2.0]])).sum().backward()
    assert out.tolist() == (torch.arange(6.0).view(3, 2) * 2).tolist()
    assert x.grad.tolist() == [[2.0, 4.0]] * 3
