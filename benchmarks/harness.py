"""One benchmark harness for muscle_fast: every peer in the same process, on the same inputs,
checked against the float64 reference before it is timed, beside the measured bandwidth floor.

Entry points: ``python -m benchmarks`` (see ``--help``) and ``pytest benchmarks/ --benchmark-only``.
Definitions of every column and of the floor: benchmarks/README.md.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from muscle_fast.ops.compat_loss.contract import N_STATS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURE = 2.0
CHECK_ROWS = 256  # correctness is checked on the first CHECK_ROWS rows of the same inputs
# tolerances vs the float64 reference: |loss - ref| <= LOSS_RTOL * max(|ref|, 1e-3);
# max|grad - ref| <= GRAD_RTOL[dtype] * max|ref| (bf16/fp16 gradients are rounded to 8/11 bits)
LOSS_RTOL = 1e-3
GRAD_RTOL = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 5e-3}
COLUMNS = ["op", "backend", "mode", "mask", "N", "V", "H", "dtype", "status", "median_ms",
           "p20_ms", "p80_ms", "reps", "peak_mb", "floor_bytes", "design_bytes", "gbps",
           "floor_fraction", "design_fraction", "copy_gbps", "err_loss", "err_grad", "note",
           "device", "threads", "load1", "torch", "triton", "commit", "date"]


# ----------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu {cpu} ({os.cpu_count()} cores)"


def env_info(device: torch.device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "absent"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=HERE).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=HERE).stdout.strip()
        commit += "+dirty" if dirty else ""
    except OSError:
        commit = "unknown"
    return dict(device=device_name(device), threads=torch.get_num_threads(),
                torch=torch.__version__, triton=tv, commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))


def load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ----------------------------------------------------------------------------- memory
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TIMING_MMAP_THRESHOLD = 32 * 2**20  # glibc's own ceiling for its dynamic threshold (64-bit)
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _cpu_malloc_setup() -> None:
    """Timing runs with a fixed 32 MB mmap threshold (glibc's own dynamic ceiling on 64-bit,
    fixed so that one peer's frees do not change the next peer's allocator behaviour)."""
    libc = _libc()
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, TIMING_MMAP_THRESHOLD)


def _cpu_memory_mode(on: bool) -> None:
    """For the one measured call: every allocation of 64 KiB or more is a fresh mapping (so it
    shows in RSS) and free heap pages are returned first (malloc_trim), so memory the process
    had already touched cannot hide an allocation."""
    libc = _libc()
    if not libc:
        return
    if on:
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    else:
        libc.mallopt(M_MMAP_THRESHOLD, TIMING_MMAP_THRESHOLD)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


class PeakMemory:
    """Peak memory growth (bytes) of a block above what was allocated when it started.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU (Linux): VmHWM after
    resetting it to the current RSS through /proc/self/clear_refs ("5"), minus VmRSS at start.
    """

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, float("nan")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _cpu_memory_mode(True)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.start = _status_kib("VmRSS:") * 1024
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            if self.start is not None:
                self.bytes = _status_kib("VmHWM:") * 1024 - self.start
            _cpu_memory_mode(False)
        return False


# ----------------------------------------------------------------------------- timing
def time_calls(run: Callable, setup: Callable, device: torch.device, *, warmup: int,
               min_reps: int, max_reps: int, budget_s: float) -> List[float]:
    """Per-call times in ms of ``run(setup())``; the setup (input copies) is outside the timing.

    CPU: time.perf_counter around each call. CUDA: a pair of CUDA events around each call, the
    L2 cache flushed (a 256 MB write) before each one. Reps: as many as fit in ``budget_s``
    after warm-up, clamped to [min_reps, max_reps].
    """
    cuda = device.type == "cuda"
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if cuda else None
    t_warm = time.perf_counter()
    for _ in range(max(warmup, 1)):
        args = setup()
        run(args)
        del args
    if cuda:
        torch.cuda.synchronize(device)
    per_call = (time.perf_counter() - t_warm) / max(warmup, 1)
    reps = int(min(max_reps, max(min_reps, budget_s / max(per_call, 1e-6))))
    times = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            args = setup()
            flush.zero_()
            start.record()
            run(args)
            end.record()
            del args
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(reps):
            args = setup()
            t0 = time.perf_counter()
            run(args)
            times.append((time.perf_counter() - t0) * 1e3)
            del args
    return times


def copy_bandwidth(device: torch.device, mb: int = 256, reps: int = 9) -> float:
    """Bytes/s of a large copy into a preallocated tensor, counting bytes read + written."""
    src = torch.randn(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda a: dst.copy_(src), lambda: None, device, warmup=2, min_reps=reps,
                       max_reps=reps, budget_s=0.0)
    return 2 * src.numel() * 4 / (statistics.median(times) / 1e3)


# ----------------------------------------------------------------------------- cases and inputs
@dataclass(frozen=True)
class Case:
    op: str  # "compat_loss" | "linear_compat_loss"
    mode: str  # "fwd" (no grad) | "full" (forward + gradient)
    mask: str  # "muscle" | "old_correct"
    N: int
    V: int
    dtype: str
    H: int = 0

    @property
    def has_new(self) -> bool:
        # "old_correct" needs only the old teacher: the benchmark gives it only that one
        return self.mask == "muscle"


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Correlated student/teachers, every label valid, both mask values frequent."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[case.dtype]
    N, V = case.N, case.V

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    if case.op == "compat_loss":
        z = randn(N, V).mul_(2.0)
        o = randn(N, V).add_(z)
        w = randn(N, V).mul_(0.5).add_(z)
        y = torch.randint(0, V, (N,), generator=g, device=device)
        half = torch.arange(N, device=device) % 2 == 0  # half the rows: student right
        y = torch.where(half, z.argmax(-1), y)
        quarter = torch.arange(N, device=device) % 4 == 1  # a quarter more: old right
        y = torch.where(quarter, o.argmax(-1), y)
        out = dict(z=z.to(dt), o=o.to(dt), w=w.to(dt) if case.has_new else None, y=y)
        del z, o, w
        return out
    H = case.H
    x = randn(N, H).to(dt)
    W = randn(V, H).div_(H ** 0.5).to(dt)
    oh = (x.float() + 0.7 * randn(N, H)).to(dt)
    ow = (W.float() + 0.5 * randn(V, H) / H ** 0.5).to(dt)
    nh = (x.float() + 0.3 * randn(N, H)).to(dt)
    nw = (W.float() + 0.2 * randn(V, H) / H ** 0.5).to(dt)
    with torch.no_grad():
        zz, oo = (torch.cat([F.linear(h[i:i + 1024].float(), m.float()).argmax(-1)
                             for i in range(0, N, 1024)]) for h, m in ((x, W), (oh, ow)))
    y = torch.randint(0, V, (N,), generator=g, device=device)
    rows = torch.arange(N, device=device)
    y = torch.where(rows % 2 == 0, zz, torch.where(rows % 4 == 1, oo, y))
    return dict(x=x, W=W, oh=oh, ow=ow, nh=nh if case.has_new else None,
                nw=nw if case.has_new else None, y=y)


def slice_rows(inputs: dict, rows: int) -> dict:
    keep = ("W", "ow", "nw")
    return {k: (v if v is None or k in keep else v[:rows]) for k, v in inputs.items()}


# ----------------------------------------------------------------------------- byte counts
def byte_counts(case: Case, backend: str, inputs: dict) -> tuple:
    """(floor_bytes, design_bytes) of one call; see README.md "The floor"."""
    if case.op != "compat_loss":
        return float("nan"), float("nan")
    N, V = case.N, case.V
    e = torch.finfo(DTYPES[case.dtype]).bits // 8
    full = case.mode == "full"
    # docs/SPEC.md section 4: the student row + each teacher row the mask needs (section 2 table:
    # muscle needs old and new, old_correct only old) read once, + the gradient written once in
    # full mode. Every label is valid in these inputs.
    n_teachers = 2 if case.has_new else 1
    floor = N * V * e * (1 + n_teachers + (1 if full else 0))
    design = float("nan")
    if backend.startswith("muscle_fast[triton") or backend.startswith("muscle_fast[native"):
        n_sel = N  # rows that reread their selected teacher in the gradient pass
        if full and not case.has_new:  # old_correct without new: only rows aligned to old
            n_sel = int((inputs["o"].argmax(-1) == inputs["y"]).sum())
        if backend.startswith("muscle_fast[triton"):
            from muscle_fast.ops.compat_loss.triton import design_bytes
            design = design_bytes(N, V, e, teachers=n_teachers, grad=full, teacher_rows=n_sel)
        else:  # the native kernel walks every row twice (statistics, then gradient)
            design = N * V * e * (1 + n_teachers) + N * N_STATS * 4
            if full:
                design += N * V * 2 * e + n_sel * V * e  # student reread, grad, teacher reread
    return floor, design


# ----------------------------------------------------------------------------- peers
class Skip(Exception):
    """This peer cannot run here; the message is the reason."""


def eager_compat(z, y, o, w, mask: str, temperature: float = TEMPERATURE, ignore_index=-100):
    """The docs/SPEC.md loss as a PyTorch user writes it: argmax mask, teacher chosen per row with
    ``where`` (one teacher log_softmax, not two), log_softmax + kl_div(log_target), mean over
    valid tokens; float32 math for any input dtype."""
    valid = y != ignore_index
    with torch.no_grad():
        if mask == "muscle":
            to_old = z.argmax(-1) != y
            teacher = torch.where(to_old.unsqueeze(-1), o, w)
        else:  # old_correct; without a new teacher the other rows contribute 0
            to_old = o.argmax(-1) == y
            teacher = o if w is None else torch.where(to_old.unsqueeze(-1), o, w)
        logp_t = F.log_softmax(teacher.float() / temperature, -1)
    logp_s = F.log_softmax(z.float() / temperature, -1)
    kl = F.kl_div(logp_s, logp_t, reduction="none", log_target=True).sum(-1)
    keep = valid if (mask == "muscle" or w is not None) else valid & to_old
    kl = torch.where(keep, kl, torch.zeros_like(kl))
    return kl.sum() / valid.sum().clamp(min=1)


def eager_linear(x, W, y, oh, ow, nh, nw, mask: str):
    """Materialised path: the three logits matrices, then the eager composition."""
    with torch.no_grad():
        o = F.linear(oh, ow)
        w = None if nh is None else F.linear(nh, nw)
    return eager_compat(F.linear(x, W), y, o, w, mask)


_COMPILED: Dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED[name] = torch.compile(fn)  # default options: what a user gets
    return _COMPILED[name]


def _liger_check(device: torch.device):
    try:
        import liger_kernel  # noqa: F401
        installed = "installed"
    except Exception as e:  # noqa: BLE001
        installed = f"not installed ({type(e).__name__})"
    if device.type != "cuda":
        raise Skip(f"liger-kernel needs CUDA (Triton GPU kernels); here it is {installed}")
    if installed != "installed":
        raise Skip(f"liger-kernel {installed}: pip install liger-kernel==0.8.5 --no-deps")


def liger_compat(z, y, o, w, mask: str, temperature: float = TEMPERATURE):
    """Liger composition of the same math: the mask and the per-row teacher choice in PyTorch,
    both log_softmax(./T) in PyTorch (float32), then ``LigerJSD(beta=0)`` = forward
    KL(p_teacher || p_student) with its fused loss+gradient kernel; rows that take no teacher
    are passed as ignore_index and the mean is rescaled to the valid-token count."""
    from liger_kernel.transformers import LigerJSD

    with torch.no_grad():
        if mask == "muscle":
            to_old = z.argmax(-1) != y
            teacher = torch.where(to_old.unsqueeze(-1), o, w)
            sel = y
        else:
            to_old = o.argmax(-1) == y
            teacher = o
            sel = torch.where(to_old, y, torch.full_like(y, -100))
        logp_t = F.log_softmax(teacher.float() / temperature, -1)
        n_sel = (sel != -100).sum()
        n_valid = (y != -100).sum().clamp(min=1)
    logq = F.log_softmax(z.float() / temperature, -1)
    loss = LigerJSD(beta=0.0, ignore_index=-100)(logq, logp_t, sel)
    return loss * (n_sel / n_valid)


def liger_linear(x, W, y, oh, ow, nh, nw, mask: str, temperature: float = TEMPERATURE):
    """Liger fused-linear composition: the mask from chunked argmax logits (no grad), then one
    ``LigerFusedLinearJSD(jsd_beta=0)`` per teacher over the rows that teacher owns."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    with torch.no_grad():
        src_h, src_w = (x, W) if mask == "muscle" else (oh, ow)
        arg = torch.cat([F.linear(src_h[i:i + 4096], src_w).argmax(-1)
                         for i in range(0, x.shape[0], 4096)])
        to_old = arg != y if mask == "muscle" else arg == y
        n_valid = (y != -100).sum().clamp(min=1)
    jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, temperature=temperature)
    lab_old = torch.where(to_old, y, torch.full_like(y, -100))
    loss = jsd(x, W, oh, ow, lab_old) * ((lab_old != -100).sum() / n_valid)
    if nh is not None:
        lab_new = torch.where(~to_old, y, torch.full_like(y, -100))
        loss = loss + jsd(x, W, nh, nw, lab_new) * ((lab_new != -100).sum() / n_valid)
    return loss


@dataclass
class Peer:
    name: str
    ops: tuple
    build: Callable  # (case, device) -> fn(inputs, grad: bool) -> (loss, grad_tensors)
    modes: tuple = ("fwd", "full")
    inplace: bool = False
    different_math: str = ""


def prepare_args(inputs: dict, grad: bool, diff_keys, inplace: bool = False) -> tuple:
    """``(leaves, args)``: ``args`` go to the loss, ``leaves`` receive the gradients (leaves made
    from ``inputs`` without a copy). In place, a differentiated input is passed as a clone of its
    leaf, a non-leaf as an lm_head output is (a leaf is refused): the clone is the buffer the
    gradient overwrites, and its backward hands that buffer to the leaf unchanged."""
    leaves, args = {}, {}
    for k, v in inputs.items():
        if v is not None and grad and k in diff_keys:
            v = v.detach().requires_grad_(True)
        leaves[k] = args[k] = v
        if v is not None and grad and k in diff_keys and inplace:
            args[k] = v.clone()
    return leaves, args


def _loss_and_grads(loss_fn, inputs: dict, grad: bool, diff_keys, inplace=False, prepared=None):
    """Run loss_fn on leaves made from ``inputs`` (or on ``prepared = prepare_args(...)``, made
    outside a timed region); returns the loss and the leaves' gradients."""
    leaves, args = prepared or prepare_args(inputs, grad, diff_keys, inplace)
    if not grad:
        with torch.no_grad():
            return loss_fn(args), ()
    loss = loss_fn(args)
    loss.backward()
    return loss.detach(), tuple(leaves[k].grad for k in diff_keys)


def _mf_builder(impl: str, inplace: bool = False):
    def build(case: Case, device: torch.device):
        from muscle_fast._dispatch import available_impls

        status = available_impls(device)[impl]
        if not status.available:
            raise Skip(status.reason)
        if case.op == "compat_loss":
            from muscle_fast import fused_compat_loss

            def fn(i):
                return fused_compat_loss(i["z"], i["y"], i["o"], i["w"], mask=case.mask,
                                         temperature=TEMPERATURE, impl=impl,
                                         inplace_backward=inplace)
            return fn, ("z",)
        from muscle_fast.linear import fused_linear_compat_loss

        def fn(i):
            return fused_linear_compat_loss(
                i["x"], i["W"], i["y"], old_hidden=i["oh"], old_weight=i["ow"],
                new_hidden=i["nh"], new_weight=i["nw"], mask=case.mask,
                temperature=TEMPERATURE, impl=impl)
        return fn, ("x", "W")
    return build


def _eager_builder(compiled: bool):
    def build(case: Case, device: torch.device):
        if case.op == "compat_loss":
            f = _compiled("compat", eager_compat) if compiled else eager_compat
            return (lambda i: f(i["z"], i["y"], i["o"], i["w"], case.mask)), ("z",)
        f = _compiled("linear", eager_linear) if compiled else eager_linear
        return (lambda i: f(i["x"], i["W"], i["y"], i["oh"], i["ow"], i["nh"], i["nw"],
                            case.mask)), ("x", "W")
    return build


def _liger_builder(case: Case, device: torch.device):
    _liger_check(device)
    if case.op == "compat_loss":
        return (lambda i: liger_compat(i["z"], i["y"], i["o"], i["w"], case.mask)), ("z",)
    return (lambda i: liger_linear(i["x"], i["W"], i["y"], i["oh"], i["ow"], i["nh"], i["nw"],
                                   case.mask)), ("x", "W")


def _torch_lce_builder(case: Case, device: torch.device):
    if not hasattr(F, "linear_cross_entropy"):
        raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy")
    return (lambda i: F.linear_cross_entropy(i["x"], i["W"], i["y"])), ("x", "W")


PEERS = [
    Peer("eager", ("compat_loss", "linear_compat_loss"), _eager_builder(False)),
    Peer("torch.compile", ("compat_loss", "linear_compat_loss"), _eager_builder(True)),
    Peer("liger", ("compat_loss", "linear_compat_loss"), _liger_builder),
    Peer("torch.linear_cross_entropy", ("linear_compat_loss",), _torch_lce_builder,
         different_math="CE only (no KL, no mask): the fused-linear CE part, checked vs f64 CE"),
    Peer("muscle_fast[torch]", ("compat_loss", "linear_compat_loss"), _mf_builder("torch")),
    Peer("muscle_fast[native]", ("compat_loss", "linear_compat_loss"), _mf_builder("native")),
    Peer("muscle_fast[native,inplace]", ("compat_loss",), _mf_builder("native", True),
         modes=("full",), inplace=True),
    Peer("muscle_fast[triton]", ("compat_loss", "linear_compat_loss"), _mf_builder("triton")),
    Peer("muscle_fast[triton,inplace]", ("compat_loss",), _mf_builder("triton", True),
         modes=("full",), inplace=True),
]
PEER_NAMES = [p.name for p in PEERS]


# ----------------------------------------------------------------------------- reference
def reference(case: Case, inputs: dict, grad: bool, peer: Peer):
    """float64 loss (and gradients) of the same rows; the ground truth of docs/SPEC.md section 2."""
    from muscle_fast.ops.compat_loss.reference import compat_loss_reference

    d = {k: (None if v is None else (v.double() if v.is_floating_point() else v))
         for k, v in inputs.items()}
    if peer.name == "torch.linear_cross_entropy":
        fn = lambda i: F.cross_entropy(F.linear(i["x"], i["W"]), i["y"])  # noqa: E731
        keys = ("x", "W")
    elif case.op == "compat_loss":
        def fn(i):
            return compat_loss_reference(i["z"], i["y"], i["o"], i["w"], mask=case.mask,
                                         temperature=TEMPERATURE)
        keys = ("z",)
    else:
        def fn(i):
            with torch.no_grad():
                o = F.linear(i["oh"], i["ow"])
                w = None if i["nh"] is None else F.linear(i["nh"], i["nw"])
            return compat_loss_reference(F.linear(i["x"], i["W"]), i["y"], o, w,
                                         mask=case.mask, temperature=TEMPERATURE)
        keys = ("x", "W")
    return _loss_and_grads(fn, d, grad, keys)


def check(case: Case, peer: Peer, fn, keys, inputs: dict, device) -> tuple:
    """(ok, err_loss, err_grad) of the peer vs float64 on the first CHECK_ROWS rows."""
    sub = slice_rows(inputs, min(case.N, CHECK_ROWS))
    grad = case.mode == "full"
    ref_loss, ref_grads = reference(case, sub, grad, peer)
    loss, grads = _loss_and_grads(fn, sub, grad, keys, inplace=peer.inplace)
    err_loss = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-3)
    err_grad = 0.0
    for g, r in zip(grads, ref_grads):
        if g is None:
            return False, err_loss, float("inf")
        err_grad = max(err_grad, float((g.double() - r).abs().max()) / max(float(r.abs().max()),
                                                                           1e-30))
    ok = err_loss <= LOSS_RTOL and (not grad or err_grad <= GRAD_RTOL[case.dtype])
    if not math.isfinite(err_loss) or not math.isfinite(err_grad):
        ok = False
    return ok, err_loss, err_grad


# ----------------------------------------------------------------------------- one case
@dataclass
class Settings:
    device: torch.device
    warmup: int = 1
    min_reps: int = 5
    max_reps: int = 50
    budget_s: float = 1.0
    copy_gbps: float = float("nan")
    env: dict = field(default_factory=dict)


def run_case(case: Case, peers: List[Peer], s: Settings) -> List[dict]:
    rows = []
    inputs = make_inputs(case, s.device)
    base = dict(op=case.op, mode=case.mode, mask=case.mask, N=case.N, V=case.V, H=case.H,
                dtype=case.dtype, copy_gbps=round(s.copy_gbps / 1e9, 2), **s.env)
    for peer in peers:
        if case.op not in peer.ops or case.mode not in peer.modes:
            continue
        row = dict(base, backend=peer.name, note=peer.different_math)
        try:
            fn, keys = peer.build(case, s.device)
        except Skip as e:
            rows.append(dict(row, status="skipped", note=str(e)))
            continue
        try:
            ok, err_loss, err_grad = check(case, peer, fn, keys, inputs, s.device)
        except Exception as e:  # noqa: BLE001  a peer that crashes is reported, not hidden
            rows.append(dict(row, status="error", note=f"{type(e).__name__}: {e}"[:200]))
            continue
        row.update(err_loss=f"{err_loss:.2e}", err_grad=f"{err_grad:.2e}")
        if not ok:
            rows.append(dict(row, status="wrong", note=(row["note"] + "; " if row["note"] else "")
                             + f"differs from float64 beyond tolerance (loss rtol {LOSS_RTOL}, "
                               f"grad rtol {GRAD_RTOL[case.dtype]})"))
            continue
        grad = case.mode == "full"
        gc.collect()

        def setup(inputs=inputs, inplace=peer.inplace):  # bound now: `inputs` is deleted below
            # in place, the call overwrites the logits: a fresh copy, made outside the timing
            return prepare_args(inputs, grad, keys, inplace)

        def run(prepared):
            _loss_and_grads(fn, None, grad, keys, prepared=prepared)
        try:
            times = time_calls(run, setup, s.device, warmup=s.warmup, min_reps=s.min_reps,
                               max_reps=s.max_reps, budget_s=s.budget_s)
            args = setup()
            with PeakMemory(s.device) as pm:
                run(args)
            del args
        except Exception as e:  # noqa: BLE001
            rows.append(dict(row, status="error", note=f"{type(e).__name__}: {e}"[:200]))
            continue
        med = statistics.median(times)
        q = statistics.quantiles(times, n=5) if len(times) >= 2 else [med] * 4
        floor_b, design_b = byte_counts(case, peer.name, inputs)
        floor_ms = floor_b / s.copy_gbps * 1e3
        row.update(status="ok", median_ms=round(med, 3), p20_ms=round(q[0], 3),
                   p80_ms=round(q[3], 3), reps=len(times), peak_mb=round(pm.bytes / 2**20, 1),
                   floor_bytes=floor_b, design_bytes=design_b,
                   gbps=round(floor_b / med / 1e6, 2) if math.isfinite(floor_b) else "",
                   floor_fraction=round(floor_ms / med, 4) if math.isfinite(floor_b) else "",
                   design_fraction=(round(design_b / s.copy_gbps * 1e3 / med, 4)
                                    if math.isfinite(design_b) else ""),
                   load1=round(load1(), 2))
        rows.append(row)
    del inputs
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- presets
def preset_cases(name: str, device: torch.device) -> List[Case]:
    cases = []

    def grid(ns, vs, dtypes, masks, modes):
        for v in vs:
            for dt in dtypes:
                for mask in masks:
                    for mode in modes:
                        for n in ns:
                            cases.append(Case("compat_loss", mode, mask, n, v, dt))

    if name == "quick":
        grid([128, 512], [32000], ["fp32", "bf16"], ["muscle"], ["full"])
        grid([128, 512], [32000], ["fp32"], ["muscle"], ["fwd"])
        cases.append(Case("linear_compat_loss", "full", "muscle", 256, 32000, "fp32", H=256))
    elif name == "headline":
        if device.type == "cuda":
            grid([8192], [128256], ["bf16"], ["muscle"], ["full"])
        else:
            grid([2048], [32000], ["fp32", "bf16"], ["muscle"], ["full"])
    elif name == "cpu":
        grid([256, 1024, 4096], [32000, 128256, 151936], ["fp32", "bf16"],
             ["muscle", "old_correct"], ["fwd", "full"])
        cases.append(Case("linear_compat_loss", "full", "muscle", 4096, 32000, "fp32", H=256))
    elif name == "gpu":
        grid([1024, 4096, 8192, 16384], [32000, 128256, 151936], ["bf16", "fp32"],
             ["muscle", "old_correct"], ["fwd", "full"])
        for dt in ("bf16", "fp32"):
            cases.append(Case("linear_compat_loss", "full", "muscle", 8192, 128256, dt, H=4096))
    else:
        raise ValueError(f"unknown preset {name!r}")
    return cases


def case_bytes(case: Case) -> int:
    """Rough input bytes, to skip cases that do not fit in memory."""
    e = torch.finfo(DTYPES[case.dtype]).bits // 8
    if case.op == "compat_loss":
        return case.N * case.V * e * 3
    return case.N * case.V * 4 * 3


def make_settings(device: torch.device, quick: bool) -> Settings:
    if device.type == "cpu":
        _cpu_malloc_setup()
        s = Settings(device, warmup=1, min_reps=3 if quick else 5, max_reps=3 if quick else 20,
                     budget_s=0.3 if quick else 3.0)
    else:
        s = Settings(device, warmup=3, min_reps=20, max_reps=200, budget_s=1.0)
    s.copy_gbps = copy_bandwidth(device, mb=1024 if device.type == "cuda" else 256)
    s.env = env_info(device)
    return s


# ----------------------------------------------------------------------------- gpu_check.sh
def _check_inputs(V: int, lead, dtype: str, device: str, seed: int):
    """Student, old and new logits near one another at vocabulary ``V`` (half the labels the
    base's argmax, two ignored): the generator (for further draws), z, o, w, y."""
    g = torch.Generator(device=device).manual_seed(seed)
    base = 2 * torch.randn(*lead, V, device=device, generator=g)
    z = base.to(DTYPES[dtype])
    o = (base + torch.randn(base.shape, device=device, generator=g)).to(DTYPES[dtype])
    w = (base + 0.5 * torch.randn(base.shape, device=device, generator=g)).to(DTYPES[dtype])
    y = torch.where(torch.rand(lead, device=device, generator=g) < 0.5, base.argmax(-1),
                    torch.randint(0, V, lead, device=device, generator=g))
    y.view(-1)[:2] = -100
    return g, z, o, w, y


def vocab_correctness(V: int = 128256, lead=(4, 16), dtype: str = "bf16", impl: str = "triton",
                      device: str = "cuda") -> int:
    """Every mask at a real vocabulary: ``fused_compat_loss(impl=...)`` loss and gradient vs the
    float64 reference on ``lead`` rows, the harness's rule (LOSS_RTOL, GRAD_RTOL). Prints one
    line per mask; returns the number that failed (for benchmarks/gpu_check.sh)."""
    import muscle_fast as mf
    from muscle_fast.ops.compat_loss.reference import MASKS, compat_loss_reference

    g, z, o, w, y = _check_inputs(V, lead, dtype, device, seed=0)
    up = torch.randn(lead, device=device, generator=g)
    failed = 0
    for mask in MASKS:
        for reduction, upstream in (("mean", None), ("none", up)):
            kw = dict(mask=mask, temperature=TEMPERATURE, ce_weight=0.1, reduction=reduction)
            zi = z.clone().requires_grad_(True)
            loss = mf.fused_compat_loss(zi, y, o, w, impl=impl, **kw)
            loss.backward(upstream)
            z64 = z.double().requires_grad_(True)
            ref = compat_loss_reference(z64, y, o.double(), w.double(), **kw)
            ref.backward(None if upstream is None else upstream.double())
            err_loss = float((loss.double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-3)
            err_grad = (float((zi.grad.double() - z64.grad).abs().max())
                        / max(float(z64.grad.abs().max()), 1e-30))
            ok = err_loss <= LOSS_RTOL and err_grad <= GRAD_RTOL[dtype]
            failed += not ok
            print(f"{impl} V={V} {dtype} rows={math.prod(lead)} mask={mask} reduction={reduction}: "
                  f"err_loss {err_loss:.2e} err_grad {err_grad:.2e} {'ok' if ok else 'WRONG'}",
                  flush=True)
    return failed


def sparse_correctness(V: int = 128256, lead=(4, 16), k: int = 64, dtype: str = "bf16",
                       impl: str = "triton", device: str = "cuda", full_k: bool = False) -> int:
    """Sparse teachers (top-k + tail, ``SparseTeacher``) at a real vocabulary: the fused kernel's
    loss and gradient vs the float64 reference of the k+1-category loss, the harness's rule
    (LOSS_RTOL, GRAD_RTOL), for both teachers sparse (muscle) and the old one only
    (old_correct); ``full_k`` adds k = V (the dense loss). Prints one line per case; returns the
    number that failed."""
    import muscle_fast as mf
    from muscle_fast import SparseTeacher
    from muscle_fast.ops.compat_loss.reference import compat_loss_reference

    _, z, o, w, y = _check_inputs(V, lead, dtype, device, seed=1)
    failed = 0
    for kk, mask in ((k, "muscle"), (k, "old_correct")) + (((V, "muscle"),) if full_k else ()):
        so = SparseTeacher.from_logits(o, k=kk, temperature=TEMPERATURE, labels=y)
        sw = SparseTeacher.from_logits(w, k=kk, temperature=TEMPERATURE)
        sw = sw if mask == "muscle" else None
        kw = dict(mask=mask, temperature=TEMPERATURE, ce_weight=0.1)
        zi = z.clone().requires_grad_(True)
        loss = mf.fused_compat_loss(zi, y, so, sw, impl=impl, **kw)
        loss.backward()
        loss = loss.detach()
        z64 = z.double().requires_grad_(True)
        ref = compat_loss_reference(z64, y, so, sw, **kw)
        ref.backward()
        err_loss = float((loss.double() - ref).abs()) / max(float(ref.abs()), 1e-3)
        err_grad = (float((zi.grad.double() - z64.grad).abs().max())
                    / max(float(z64.grad.abs().max()), 1e-30))
        ok = err_loss <= LOSS_RTOL and err_grad <= GRAD_RTOL[dtype]
        failed += not ok
        print(f"{impl} sparse V={V} k={kk} {dtype} rows={math.prod(lead)} mask={mask}: "
              f"err_loss {err_loss:.2e} err_grad {err_grad:.2e} {'ok' if ok else 'WRONG'}",
              flush=True)
    return failed


def sparse_headline(N: int = 8192, V: int = 128256, k: int = 64, dtype: str = "bf16",
                    device: str = "cuda", budget_s: float = 3.0) -> None:
    """The sparse kernel's headline row: forward + backward of ``fused_compat_loss`` (muscle,
    T = 2, in place) with both teachers sparse (k ids + tail) against both dense, in the same
    run, median ms over CUDA-event-timed calls (``time_calls``), with the bytes each design
    moves and the copy bandwidth: prints one line per design (benchmarks/gpu_check.sh)."""
    import muscle_fast as mf
    from muscle_fast import SparseTeacher
    from muscle_fast.ops.compat_loss import triton as tk

    dev = torch.device(device)
    g = torch.Generator(device=device).manual_seed(2)
    z = torch.randn(N, V, device=device, generator=g, dtype=DTYPES[dtype]) * 2
    o = (z.float() + torch.randn(N, V, device=device, generator=g)).to(DTYPES[dtype])
    w = (z.float() + 0.5 * torch.randn(N, V, device=device, generator=g)).to(DTYPES[dtype])
    y = torch.randint(0, V, (N,), device=device, generator=g)
    so = SparseTeacher.from_logits(o, k=k, temperature=TEMPERATURE, labels=y)
    sw = SparseTeacher.from_logits(w, k=k, temperature=TEMPERATURE)
    e = z.element_size()
    bw = copy_bandwidth(dev)
    designs = (("dense", o, w, tk.design_bytes(N, V, e, teachers=2, grad=True)),
               ("sparse", so, sw, tk.design_bytes_sparse(N, V, e, k=k, teachers=2, grad=True)))
    for name, old, new, nbytes in designs:
        def run(x, old=old, new=new):
            mf.fused_compat_loss(x, y, old, new, impl="triton", temperature=TEMPERATURE,
                                 inplace_backward=True).backward()

        times = time_calls(run, lambda: (z.clone().requires_grad_(True) * 1), dev, warmup=2,
                           min_reps=5, max_reps=50, budget_s=budget_s)
        ms = statistics.median(times)
        print(f"sparse-headline design={name} N={N} V={V} k={k} {dtype} muscle T={TEMPERATURE} "
              f"fwd+bwd inplace: median {ms:.3f} ms over {len(times)} calls; design bytes "
              f"{nbytes / 1e9:.2f} GB = {nbytes / bw * 1e3:.3f} ms at the copy bandwidth "
              f"{bw / 1e9:.0f} GB/s ({nbytes / bw * 1e3 / ms:.2f} of it)", flush=True)
