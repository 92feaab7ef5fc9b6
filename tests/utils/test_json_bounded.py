"""utils.json_bounded: network JSON nested too deep is a ValueError, never a RecursionError."""

from __future__ import annotations

import pytest

from megatron_vpmoe.utils.json_bounded import MAX_DEPTH, TooDeep, depth, loads


def test_depth_counts_containers_without_recursion():
    assert depth(5) == 0 and depth([]) == 1 and depth({"a": [1, {"b": []}]}) == 4
    deep = []
    for _ in range(100000):  # far past the interpreter's recursion limit
        deep = [deep]
    assert depth(deep) == 100001


@pytest.mark.parametrize("text", ["[" * 200000 + "]" * 200000, '{"a": ' * 5000 + "1" + "}" * 5000,
                                  "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)])
def test_too_deep_is_a_value_error(text):
    with pytest.raises(TooDeep, match=f"nested deeper than {MAX_DEPTH} levels"):
        loads(text)
    with pytest.raises(ValueError):
        loads(text.encode())


def test_within_the_limit_parses_as_json_does():
    text = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert depth(loads(text)) == MAX_DEPTH
    assert loads(b'{"choices": [{"message": {"content": "hi"}}]}') == {"choices": [{"message": {"content": "hi"}}]}
    assert loads("[[1]]", max_depth=2) == [[1]]
    with pytest.raises(TooDeep):
        loads("[[1]]", max_depth=1)
    with pytest.raises(ValueError):
        loads("{not json")
