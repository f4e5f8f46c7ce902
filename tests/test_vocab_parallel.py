"""Vocabulary parallel loss: 2 and 3 CPU processes over gloo equal one process on the whole vocabulary.

Each test launches this file as a script once per rank (``python tests/test_vocab_parallel.py
WORLD OUT_DIR``) with the environment torchrun sets and a ``file://`` rendezvous in a tmp dir.
Every rank builds the same inputs from one seed, keeps its own (uneven) slice of the vocabulary
columns, runs every case of ``CASES`` and saves its loss, stats and gradient slice. The test then
checks, per case:

- loss and stats are the same on every rank;
- loss, stats and the gradient (slices concatenated in rank order) pass the rule of the core tests
  against the single-process float64 reference: ``|vp - ref64| <= 2 |torch_same_dtype - ref64| +
  atol[dtype]``, where torch_same_dtype is the single-process ``impl="torch"`` run;
- float64 inputs with ``impl="torch"``: within 1e-12 of the reference (the combination is exact
  up to rounding, so any error in it would show far above that).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 300
SPLITS = {2: (25, 12), 3: (10, 20, 7)}  # uneven slices of V = 37
V = 37
B, T = 3, 5
MASKS = ("muscle", "old_correct", "token_likelihood", "sequence_likelihood", "all_old", "tensor")


def _impls(device):
    from muscle_fast import available_impls

    return [i for i in ("torch", "native", "triton") if available_impls(device)[i].available]


def _triton_core(case):
    """The Triton cases of a run that is not `every` (the default run's 3 ranks; the interpreter
    takes about a second a case and rank): each mask form, sequence ids, per-token reduction,
    in-place gradient, no valid token, no new teacher, rows far from 0. Its kernels of partials
    and gradient rows are checked option by option in test_vocab_parallel_kernels.py."""
    plain = set(case) == {"impl", "dtype", "mask", "ce_weight"}  # a mask and nothing else
    return ((case["mask"] in ("muscle", "tensor") and plain)
            or any(case.get(k) for k in ("sequence_ids", "inplace_backward", "all_ignored"))
            or case.get("reduction") == "none" or case.get("new") is False
            or (case.get("magnitude", False) and case["mask"] == "all_old"))


def _cases(device="cpu", every=True):
    """The cases: dicts of options (identical in the parent and the workers); not `every`:
    Triton's cases cut to `_triton_core`."""
    out = []
    for impl in _impls(device):
        dtypes = (torch.float32, torch.bfloat16) if impl != "triton" else (torch.float32,)
        for dtype in dtypes:
            for mask in MASKS:
                out.append(dict(impl=impl, dtype=dtype, mask=mask, ce_weight=0.5))
            out.append(dict(impl=impl, dtype=dtype, mask="muscle", ce_weight=0.0, reduction="sum"))
        out += [
            dict(impl=impl, dtype=torch.float32, mask="old_correct", new=False, ce_weight=0.0),
            dict(impl=impl, dtype=torch.float32, mask="tensor", new=False, kl_weight=0.0,
                 ce_weight=1.0),
            dict(impl=impl, dtype=torch.float32, mask="muscle", ignore_index=7, temperature=1.0),
            dict(impl=impl, dtype=torch.float32, mask="sequence_likelihood", sequence_ids=True),
            dict(impl=impl, dtype=torch.float32, mask="muscle", reduction="none", ce_weight=0.3),
            dict(impl=impl, dtype=torch.float32, mask="token_likelihood", num_items=40,
                 inplace_backward=True),
            dict(impl=impl, dtype=torch.float32, mask="muscle", all_ignored=True),
            dict(impl=impl, dtype=torch.float32, mask="muscle", vocab_start=True, validate=False),
            # rows far from 0 (issue #23 item 3): the combination moves O(1) partials only
            dict(impl=impl, dtype=torch.float32, mask="all_old", ce_weight=1.0, magnitude=True),
            dict(impl=impl, dtype=torch.float32, mask="token_likelihood", ce_weight=1.0,
                 magnitude=True),
        ]
    out += [dict(impl="torch", dtype=torch.float64, mask=m, ce_weight=0.25) for m in MASKS]
    return [c for c in out if every or c["impl"] != "triton" or _triton_core(c)]


def _inputs(case):
    """Global inputs [B, T, V]: ties of the maximum across slices, -inf columns, ignored tokens."""
    g = torch.Generator().manual_seed(len(str(sorted(case.items(), key=str))))
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    o = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    w = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    top = max(float(z.max()), float(o.max())) + 1
    z[0, 0, 3] = z[0, 0, 30] = top  # the student's argmax ties across two slices: 3 wins
    o[0, 1, 24] = o[0, 1, 25] = top  # the old model's tie at the 2-way split's boundary
    o[0, 2, 9] = o[0, 2, 10] = top  # and at the 3-way split's first boundary
    # masked vocabulary entries (-inf in every model): rank 0's whole slice in the 3-way split
    z[1, 2, :12] = o[1, 2, :12] = w[1, 2, :12] = float("-inf")
    o[2, 3, 10:30] = float("-inf")  # the old model puts no mass there
    if case.get("magnitude"):
        # student rows constant at +-1e4 ... 1e30, teachers offset by up to 1e30, an old row
        # constant at 1e38 (float64 losses of order 1; issue #23 item 3)
        z[0] = torch.tensor([1e4, 1e7, 1e10, 1e30, -1e30], dtype=torch.float64)[:, None]
        z[2] = z[2] + 1e10
        o[1] = o[1] + 1e30
        w[1] = w[1] - 1e10
        o[2, 1] = 1e38
        o[2, 3] = o[2, 3] + 1e7
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0], labels[0, 1], labels[0, 2] = 3, 24, 9
    ignore = case.get("ignore_index", -100)
    labels[1, 0] = ignore
    labels[2, 4] = ignore
    if case.get("all_ignored"):
        labels[:] = ignore
    dtype = case["dtype"]
    z, o, w = (x.to(dtype) for x in (z, o, w))
    mask = (torch.rand(B, T, generator=g) > 0.5) if case["mask"] == "tensor" else None
    seq = torch.tensor([[0, 0, 1, 1, 1]] * B) if case.get("sequence_ids") else None
    return z, o, (w if case.get("new", True) else None), labels, mask, seq


def _kwargs(case, mask, seq):
    kw = dict(mask=mask if case["mask"] == "tensor" else case["mask"],
              temperature=case.get("temperature", 2.0), kl_weight=case.get("kl_weight", 1.0),
              ce_weight=case.get("ce_weight", 0.0), ignore_index=case.get("ignore_index", -100),
              reduction=case.get("reduction", "mean"), sequence_ids=seq, return_stats=True)
    if "num_items" in case:
        kw["num_items"] = torch.tensor(case["num_items"])
    return kw


def _upstream(case):
    if case.get("reduction") == "none":
        return torch.linspace(-1, 2, B * T).reshape(B, T)
    return torch.tensor(0.75)


def _run(z, labels, o, w, kw, upstream, **extra):
    """loss, stats dict, gradient."""
    from muscle_fast import fused_compat_loss

    z = z.clone().requires_grad_()
    # in place: on a non-leaf, as an lm_head output is (a leaf is refused)
    x = z.clone() if extra.get("inplace_backward") else z
    loss, stats = fused_compat_loss(x, labels, o, w, **kw, **extra)
    (loss * upstream).sum().backward()
    stats = {k: v.detach().double().cpu() for k, v in vars(stats).items() if v is not None}
    return loss.detach().double().cpu(), stats, z.grad.double().cpu()


# ---- fused_linear_compat_loss with a column-sharded lm_head

H = 8


def _linear_cases(device="cpu", every=True):
    out = []
    for impl in _impls(device):
        for dtype in ((torch.float32, torch.bfloat16) if impl != "triton" else (torch.float32,)):
            out.append(dict(impl=impl, dtype=dtype, mask="muscle", ce_weight=0.5))
        out += [
            dict(impl=impl, dtype=torch.float32, mask="sequence_likelihood"),
            dict(impl=impl, dtype=torch.float32, mask="old_correct", new=False, reduction="none",
                 ce_weight=0.2),
            dict(impl=impl, dtype=torch.float32, mask="token_likelihood", frozen=True,
                 chunk_size=4),
        ]
    # not `every`: Triton with the MUSCLE mask only (the chunked pass is the same for every backend)
    return [c for c in out if every or c["impl"] != "triton" or c["mask"] == "muscle"]


def _linear_inputs(case):
    g = torch.Generator().manual_seed(len(str(sorted(case.items(), key=str))))
    dtype = case["dtype"]
    h = torch.randn(B, T, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    old_h = torch.randn(B, T, H, generator=g).to(dtype)
    old_w = torch.randn(V, H, generator=g).to(dtype)
    new_logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype) if case.get("new", True) else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 0] = labels[2, 4] = -100
    return h, weight, bias, old_h, old_w, new_logits, labels


def _run_linear(case, h, weight, bias, old_h, old_w, new_logits, labels, **extra):
    """loss, stats, grads of hidden, weight (None when frozen), bias."""
    from muscle_fast import fused_linear_compat_loss

    h = h.clone().requires_grad_()
    weight = weight.clone().requires_grad_(not case.get("frozen"))
    bias = bias.clone().requires_grad_()
    loss, stats = fused_linear_compat_loss(
        h, weight, labels, bias=bias, old_hidden=old_h, old_weight=old_w, new_logits=new_logits,
        mask=case["mask"], ce_weight=case.get("ce_weight", 0.0),
        reduction=case.get("reduction", "mean"), chunk_size=case.get("chunk_size"),
        return_stats=True, **extra)
    (loss * _upstream(case).to(loss.device)).sum().backward()
    stats = {k: v.detach().double().cpu() for k, v in vars(stats).items() if v is not None}
    grads = [None if x.grad is None else x.grad.double().cpu() for x in (h, weight, bias)]
    return loss.detach().double().cpu(), stats, grads


# ------------------------------------------------------------------ worker (one rank)


def _on(device, *xs):
    return [x.to(device) if isinstance(x, torch.Tensor) else x for x in xs]


def _worker(world: int, out_dir: str, device: str, every: bool) -> None:
    """One rank: every case on this rank's vocabulary slice, on ``device`` (gloo also carries CUDA
    tensors, so 2-3 processes can share one GPU)."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                            world_size=world)
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    cols = slice(start, start + sizes[rank])
    results = []
    for case in _cases(device, every):
        z, o, w, labels, mask, seq = _on(device, *_inputs(case))
        kw = {k: _on(device, v)[0] for k, v in _kwargs(case, mask, seq).items()}
        extra = dict(process_group=dist.group.WORLD, impl=case["impl"],
                     inplace_backward=case.get("inplace_backward", False),
                     validate=case.get("validate", True))
        if case.get("vocab_start"):
            extra["vocab_start"] = start
        local = [None if x is None else x[..., cols].contiguous() for x in (z, o, w)]
        results.append(_run(local[0], labels, local[1], local[2], kw,
                            _upstream(case).to(device), **extra))
    linear = []
    for case in _linear_cases(device, every):
        h, weight, bias, old_h, old_w, new_logits, labels = _on(device, *_linear_inputs(case))
        rows = slice(start, start + sizes[rank])
        linear.append(_run_linear(
            case, h, weight[rows], bias[rows], old_h, old_w[rows],
            None if new_logits is None else new_logits[..., rows], labels,
            process_group=dist.group.WORLD, impl=case["impl"]))
    errors = {}
    z, o, w, labels, _, _ = _on(device, *_inputs(dict(dtype=torch.float32, mask="muscle")))
    local = [x[..., cols] for x in (z, o, w)]
    from muscle_fast import fused_compat_loss

    def error_of(**kw):
        try:
            fused_compat_loss(*local[:1], kw.pop("labels", labels), *local[1:], **kw)
        except (ValueError, TypeError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    group = dist.group.WORLD
    errors["overlap"] = error_of(process_group=group, vocab_start=0)
    errors["some_ranks"] = error_of(process_group=group, vocab_start=None if rank else 0)
    bad = labels.clone()
    bad[0, 0] = V
    errors["label"] = error_of(process_group=group, labels=bad)
    errors["no_group"] = error_of(vocab_start=start)
    with torch.no_grad():
        nan_loss = fused_compat_loss(local[0], bad, *local[1:], process_group=group,
                                     vocab_start=start, validate=False, reduction="none")
    errors["nan_row"] = nan_loss.isnan().reshape(-1).tolist()
    errors["impls"] = _impls(device)
    torch.save({"results": results, "linear": linear, "errors": errors},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


# ------------------------------------------------------------------ the tests


def _launch(world: int, tmp_path: Path, device: str, every: bool):
    env_base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env_base["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env_base.get("PYTHONPATH", "")])
    env_base["OMP_NUM_THREADS"] = "1"
    procs = []
    for rank in range(world):
        env = dict(env_base, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(world), str(tmp_path), device,
             "every" if every else "core"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"vocabulary parallel workers timed out after {TIMEOUT_S} s")
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _check_case(case, per_rank, what):
    from conftest import assert_pass_rule

    z, o, w, labels, mask, seq = _inputs(case)
    kw = _kwargs(case, mask, seq)
    up = _upstream(case)
    ref = _run(z.double(), labels, o.double(), None if w is None else w.double(), kw, up,
               impl="torch")
    same = _run(z, labels, o, w, kw, up, impl="torch")
    loss0, stats0, _ = per_rank[0]
    for r, (loss, stats, _) in enumerate(per_rank[1:], 1):
        assert torch.equal(loss, loss0) or torch.allclose(loss, loss0, rtol=0, atol=0, equal_nan=True), \
            f"{what}: rank {r} loss differs from rank 0"
        assert stats.keys() == stats0.keys()
        for k in stats:
            assert torch.equal(stats[k], stats0[k]), f"{what}: rank {r} stat {k} differs"
    grad = torch.cat([g for _, _, g in per_rank], -1)
    got = (loss0, stats0, grad)
    dtype = case["dtype"]
    if dtype == torch.float64:
        from conftest import max_err

        for name, a, b in (("loss", got[0], ref[0]), ("grad", got[2], ref[2])):
            assert max_err(a, b) <= 1e-12, f"{what}: {name} off by {max_err(a, b):.3g}"
        for k in ref[1]:
            assert max_err(got[1][k], ref[1][k]) <= 1e-12, f"{what}: stat {k}"
        return
    assert_pass_rule(got[0], same[0], ref[0], dtype, f"{what} loss")
    assert set(got[1]) == set(ref[1]), f"{what}: stats fields"
    for k in ref[1]:
        assert_pass_rule(got[1][k], same[1][k], ref[1][k], dtype, f"{what} stat {k}")
    assert_pass_rule(got[2], same[2], ref[2], dtype, f"{what} grad")


def _check_linear_case(case, per_rank, what):
    from conftest import assert_pass_rule

    inputs = _linear_inputs(case)
    ref = _run_linear(case, *(x if x is None or not x.is_floating_point() else x.double()
                              for x in inputs), impl="torch")
    same = _run_linear(case, *inputs, impl="torch")
    loss0, stats0, (gh0, _, _) = per_rank[0]
    for r, (loss, stats, (gh, _, _)) in enumerate(per_rank[1:], 1):
        assert torch.equal(loss, loss0), f"{what}: rank {r} loss differs from rank 0"
        assert all(torch.equal(stats[k], stats0[k]) for k in stats0), f"{what}: rank {r} stats"
        assert torch.equal(gh, gh0), f"{what}: rank {r} hidden gradient differs from rank 0"
    dtype = case["dtype"]
    assert_pass_rule(loss0, same[0], ref[0], dtype, f"{what} loss")
    for k in ref[1]:
        assert_pass_rule(stats0[k], same[1][k], ref[1][k], dtype, f"{what} stat {k}")
    assert_pass_rule(gh0, same[2][0], ref[2][0], dtype, f"{what} grad hidden")
    for i, name in ((1, "weight"), (2, "bias")):
        if ref[2][i] is None:
            assert all(g[i] is None for _, _, g in per_rank), f"{what}: frozen {name} got a grad"
            continue
        got = torch.cat([g[i] for _, _, g in per_rank], 0)
        assert_pass_rule(got, same[2][i], ref[2][i], dtype, f"{what} grad {name}")


def _check_all(cases, per_case, check, label):
    failures = []
    for i, case in enumerate(cases):
        what = f"{label} case {i} {case}"
        try:
            check(case, per_case(i), what)
        except AssertionError as e:
            failures.append(str(e).split("\n")[0])
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("world,device,every", [
    # the default run launches 3 ranks: uneven slices, ties at both boundaries, a rank whose
    # whole slice is masked in a row; every case of torch and native, Triton's `_triton_core`.
    # 2 ranks run every case of every backend on other slices (slow, 30 s)
    pytest.param(2, "cpu", True, id="2-cpu", marks=pytest.mark.slow),
    pytest.param(3, "cpu", False, id="3-cpu"),
    # the Triton kernels on a GPU: 2 processes share it (gloo carries CUDA tensors)
    pytest.param(2, "cuda", True, id="2-cuda", marks=pytest.mark.gpu)])
def test_vocab_parallel_equals_one_process(world, device, every, tmp_path):
    ranks = _launch(world, tmp_path, device, every)
    assert ranks[0]["errors"]["impls"] == _impls(device)
    _check_all(_cases(device, every), lambda i: [r["results"][i] for r in ranks], _check_case,
               f"world {world} {device} fused_compat_loss")
    _check_all(_linear_cases(device, every), lambda i: [r["linear"][i] for r in ranks],
               _check_linear_case, f"world {world} {device} fused_linear_compat_loss")

    errors = [r["errors"] for r in ranks]
    assert all("tile" in e["overlap"] for e in errors), errors[0]["overlap"]
    assert all("every rank" in e["some_ranks"] for e in errors), errors[0]["some_ranks"]
    assert all("labels must lie in [0, 37)" in e["label"] for e in errors), errors[0]["label"]
    assert all("without process_group" in e["no_group"] for e in errors), errors[0]["no_group"]
    # validate=False: the label no rank owns makes its token NaN, and only that token
    for e in errors:
        assert e["nan_row"][0] and not any(e["nan_row"][1:]), e["nan_row"]


def test_errors_without_a_process_group():
    """Checked before any collective: no initialised group, or vocab_start alone."""
    import torch.distributed as dist

    from muscle_fast import fused_compat_loss, fused_linear_compat_loss

    assert not dist.is_initialized()
    z, o, w, labels, _, _ = _inputs(dict(dtype=torch.float32, mask="muscle"))
    with pytest.raises(ValueError, match="not initialized"):
        fused_compat_loss(z, labels, o, w, process_group=object())
    with pytest.raises(ValueError, match="without process_group"):
        fused_compat_loss(z, labels, o, w, vocab_start=0)
    h = torch.randn(B, T, H)
    with pytest.raises(ValueError, match="not initialized"):
        fused_linear_compat_loss(h, torch.randn(V, H), labels, old_logits=o, new_logits=w,
                                 process_group=object())


if __name__ == "__main__":
    import conftest  # noqa: F401  (the test-time Triton interpreter patches, as under pytest)

    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "every")
