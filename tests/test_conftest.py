"""The test-time machinery of conftest.py.

- The Triton interpreter patch: tl.reduce as a tree gives what the interpreter's own
  left-to-right fold gives, and what torch gives (exact on integer-valued floats; the leftmost of
  tied maxima, so the pairs keep their order).
- Under `make test` (pytest-xdist, --dist loadgroup) a module whose module-scoped fixture is
  expensive runs on one worker: its tests carry the group in their node id, which is what
  xdist's scheduler reads (pytest 9.2 with xdist 3.8 dropped it, and such fixtures ran once a
  worker).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

INTERPRETED = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    or not getattr(interpreter.ReduceOps, "_tree", False), reason="the interpreter patch is off")


@triton.jit
def _sum_and_first_max(s, a, i, t, b, j):
    """(sum, max, index of the leftmost max): a fold out of order gets the index wrong."""
    take = b > a
    return s + t, tl.where(take, b, a), tl.where(take, j, i)


@triton.jit
def _reduce_kernel(x_ptr, sum_ptr, max_ptr, idx_ptr, R: tl.constexpr, C: tl.constexpr,
                   AXIS: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    x = tl.load(x_ptr + offs)
    if AXIS == 0:
        s, m, i = tl.reduce((x, x, offs), 0, _sum_and_first_max)
        out = tl.arange(0, C)
    elif AXIS == 1:
        s, m, i = tl.reduce((x, x, offs), 1, _sum_and_first_max, keep_dims=True)
        out = tl.arange(0, R)[:, None]
    else:
        s, m, i = tl.reduce((x, x, offs), None, _sum_and_first_max)
        out = 0
    tl.store(sum_ptr + out, s)
    tl.store(max_ptr + out, m)
    tl.store(idx_ptr + out, i)


def _run(x, axis, tree):
    ops = interpreter.ReduceOps
    saved = ops.generic_reduce
    ops.generic_reduce = saved if tree else ops._fold
    try:
        R, C = x.shape
        n = {0: C, 1: R, 2: 1}[axis]
        outs = (torch.empty(n), torch.empty(n), torch.empty(n, dtype=torch.int32))
        _reduce_kernel[(1,)](x, *outs, R=R, C=C, AXIS=axis)
        return outs
    finally:
        ops.generic_reduce = saved


@INTERPRETED
@pytest.mark.parametrize("shape", [(1, 1), (1, 8), (16, 2), (4, 32)])
@pytest.mark.parametrize("axis", [0, 1, 2], ids=["axis0", "axis1-keep", "all"])
def test_tree_reduce_equals_the_fold(shape, axis):
    x = torch.randint(-3, 3, shape, generator=torch.Generator().manual_seed(sum(shape))).float()
    tree = _run(x, axis, tree=True)
    if axis != 2:  # over all elements the fold flattens only the first of a tuple: torch decides
        for got, want in zip(tree, _run(x, axis, tree=False)):
            assert torch.equal(got, want), (got, want)
    dim = None if axis == 2 else axis
    flat = x.reshape(-1) if dim is None else x
    want_sum = flat.sum() if dim is None else flat.sum(dim)
    # torch.argmax: the first of tied maxima
    first = flat.argmax() if dim is None else flat.argmax(dim)
    idx = first if dim is None else (first * x.shape[1] + torch.arange(x.shape[1]) if dim == 0
                                     else torch.arange(x.shape[0]) * x.shape[1] + first)
    assert torch.equal(tree[0], want_sum.reshape(-1))
    assert torch.equal(tree[2].long(), idx.reshape(-1))


@pytest.fixture(scope="module")
def _module_state():
    return object()


def test_a_module_fixture_keeps_its_module_on_one_worker(_module_state, request):
    config = request.config
    if not (os.environ.get("PYTEST_XDIST_WORKER") and config.getvalue("loadgroup")):
        pytest.skip("not under pytest-xdist --dist loadgroup")
    assert request.node.get_closest_marker("xdist_group") is not None
    assert request.node.nodeid.endswith("@tests/test_conftest.py"), request.node.nodeid


def test_matrix_marks_the_slow_part_and_keeps_ids_and_marks():
    from conftest import matrix

    gpu = pytest.mark.gpu
    cases = matrix(["a", "b"], [pytest.param(1, 2, id="one-two"),
                                pytest.param(3, 4, id="x", marks=gpu)],
                   slow_if=lambda s, i, j: s == "b" and i == 1)
    assert [c.id for c in cases] == ["a-one-two", "a-x", "b-one-two", "b-x"]
    assert [c.values for c in cases] == [("a", 1, 2), ("a", 3, 4), ("b", 1, 2), ("b", 3, 4)]
    names = [sorted(m.name for m in c.marks) for c in cases]
    assert names == [[], ["gpu"], ["slow"], ["gpu"]]
