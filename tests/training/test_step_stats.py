"""Named step statistics: a layout packs named fields into one vector and reads them back by name."""

import pytest
import torch

from megatron_vpmoe.training.step_stats import Fields


def test_view_writes_into_the_vector_and_unpack_reads_by_name():
    layout = Fields(nll=1, role_nll=3, bytes=1)
    vec = layout.zeros()
    named = layout.view(vec)
    named.nll = 2.5
    named.role_nll = torch.tensor([0.0, 1.0, 4.0])
    named.bytes = 7
    assert vec.tolist() == [2.5, 0.0, 1.0, 4.0, 7.0]
    assert float(named.nll) == 2.5 and named.role_nll.tolist() == [0.0, 1.0, 4.0]
    # the engine sums such vectors over micro-batches and ranks; the names survive the sum
    assert layout.unpack(vec + vec) == {"nll": 5.0, "role_nll": [0.0, 2.0, 8.0], "bytes": 14.0}


def test_pack_orders_fields_and_the_variable_tail_takes_the_rest():
    row = Fields(counts=2, grad_norm=1, finite=1, load=None)
    a = row.pack(counts=torch.tensor([1.0, 3.0]), grad_norm=torch.tensor(0.5), finite=torch.tensor(True),
                 load=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    b = row.pack(counts=[0.0, 0.0], grad_norm=1.0, finite=0.0, load=[])
    assert a.dtype == torch.float64 and a.tolist() == [1.0, 3.0, 0.5, 1.0, 1.0, 2.0, 3.0, 4.0]
    assert row.unpack(a)["load"] == [1.0, 2.0, 3.0, 4.0] and row.unpack(b)["load"] == []
    assert row.unpack(b)["finite"] == 0.0


def test_layout_mistakes_are_named():
    with pytest.raises(ValueError, match="only the last field"):
        Fields(load=None, nll=1)
    layout = Fields(nll=1, role_nll=2)
    with pytest.raises(ValueError, match="'role_nll' has 3 values"):
        layout.pack(nll=1.0, role_nll=[1.0, 2.0, 3.0])
    with pytest.raises(KeyError, match="expected fields"):
        layout.pack(nll=1.0)
    with pytest.raises(AttributeError, match="no field 'aux'"):
        layout.view(layout.zeros()).aux
    with pytest.raises(ValueError, match="4 values"):
        layout.unpack([0.0] * 4)
