"""pytest-benchmark entry point: ``pytest benchmarks/ --benchmark-only`` (small shapes, fast).

Each test checks its peer against the float64 reference first (the harness's ``check``), then
lets pytest-benchmark time it. Peers that cannot run here are skipped with the reason.
torch.compile is left out here (its compile time dominates small shapes); it runs in
``python -m benchmarks``.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import harness as H

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PEERS = [p for p in H.PEERS if p.name != "torch.compile"]
CASES = [H.Case("compat_loss", mode, "muscle", 128, 8192, dt)
         for mode in ("fwd", "full") for dt in ("fp32", "bf16")]
CASES.append(H.Case("linear_compat_loss", "full", "muscle", 128, 8192, "fp32", H=64))


@pytest.fixture(scope="module", autouse=True)
def _malloc():
    if DEVICE.type == "cpu":
        H._cpu_malloc_setup()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.mode}-{c.dtype}-N{c.N}-V{c.V}")
@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_bench(benchmark, case, peer):
    if case.op not in peer.ops or case.mode not in peer.modes:
        pytest.skip(f"{peer.name} has no {case.op} {case.mode}")
    try:
        fn, keys = peer.build(case, DEVICE)
    except H.Skip as e:
        pytest.skip(str(e))
    inputs = H.make_inputs(case, DEVICE)
    ok, err_loss, err_grad = H.check(case, peer, fn, keys, inputs, DEVICE)
    assert ok, f"{peer.name} differs from float64: loss {err_loss:.2e}, grad {err_grad:.2e}"
    grad = case.mode == "full"

    def setup():  # in place, the call overwrites the logits: a fresh copy, outside the timing
        return (H.prepare_args(inputs, grad, keys, peer.inplace),), {}

    def run(prepared):
        H._loss_and_grads(fn, None, grad, keys, prepared=prepared)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(err_loss=err_loss, err_grad=err_grad, device=str(DEVICE))
    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
