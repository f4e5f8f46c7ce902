"""Shared test setup: seeds, the gpu marker, the pass rule and its tolerance table."""
import itertools
import os

import torch

# Without CUDA, Triton kernels run on CPU tensors in the interpreter. It must be on before the
# first @triton.jit is decorated, so it is set here, ahead of any muscle_fast import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _interpreter_rounds_bf16_to_nearest_even():
    """The Triton interpreter truncates float32 -> bfloat16 (it has no RTNE cast), where the GPU
    and PyTorch round to nearest even. Tests compare against PyTorch, so the emulator is fixed
    here to do what the hardware does; the kernels are unchanged."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def cast_rtne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.array(src.data, dtype=np.float32, copy=True))
            bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return cast_impl(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_rtne


def _interpreter_patches_the_language_once_a_launch():
    """Triton's interpreter (3.x) patches triton.language for the interpreter (inspect.getmembers
    over tl, tl.tensor, tl.math) at each launch, and again at every call of a @triton.jit helper
    inside the kernel: a few ms a call, for every block of every row, about 40% of an interpreted
    test's time. Within a launch the language is already patched for the kernel, so a helper
    whose module sees no other language module skips the repeat; the launch restores the
    language at its end as before. Kernels and results are unchanged; test time only."""
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    if not callable(patch_lang) or getattr(patch_lang, "_once_a_launch", False):
        return
    patched = set()  # ids of the language modules the running launch has patched

    class _Nothing:
        def restore(self):
            pass

    seen = {}  # fn -> ids of the language modules its globals hold (globals are fixed)

    def langs(fn):
        if fn not in seen:
            seen[fn] = {id(v) for v in fn.__globals__.values()
                        if inspect.ismodule(v) and v in (tl, tl.core)}
        return seen[fn]

    def patch_lang_once(fn):
        wanted = langs(fn)
        if patched and wanted <= patched:
            return _Nothing()
        scope = patch_lang(fn)
        patched.update(wanted)
        return scope

    def launch_and_forget(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:  # the launch restored the language
            patched.clear()

    patch_lang_once._once_a_launch = True
    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = launch_and_forget


def _interpreter_reduces_as_a_tree():
    """The interpreter's tl.reduce with a combine function of its own (not max/min/sum, which
    it hands to numpy) folds the elements one at a time in Python: a block of B elements costs
    B - 1 interpreted calls of the combine function, over half of an interpreted test's time.
    The hardware reduces as a tree; so does this, combining neighbouring pairs (element 2i with
    2i + 1, order kept, so only the associativity tl.reduce asks of a combine function is used;
    Triton's block dimensions are powers of two): log2(B) calls, each on half the elements.
    Kernels unchanged; a sum is then formed in the hardware's pairwise order rather than left
    to right (tests/test_conftest.py checks it against the fold)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    ops = getattr(interpreter, "ReduceOps", None)
    if ops is None or not hasattr(ops, "generic_reduce") or getattr(ops, "_tree", False):
        return

    def tree_reduce(self, input):
        original_axis, axis = self.axis, 0 if self.axis is None else self.axis
        dtypes = [arg.dtype for arg in input]
        data = [arg.handle.data.reshape(-1) if original_axis is None else arg.handle.data
                for arg in input]  # (the fold's unravel flattens only the first of a tuple)
        shape = data[0].shape
        if shape[axis] & (shape[axis] - 1):  # not a power of two (Triton allows none): the fold
            return ops._fold(self, input)
        def pick(d, s):  # the elements s of d along the axis
            return d[(slice(None),) * axis + (s,)]

        while data[0].shape[axis] > 1:
            n = data[0].shape[axis]
            left = [self.to_tensor(np.ascontiguousarray(pick(d, slice(0, n - 1, 2))), t)
                    for d, t in zip(data, dtypes)]
            right = [self.to_tensor(np.ascontiguousarray(pick(d, slice(1, n, 2))), t)
                     for d, t in zip(data, dtypes)]
            out = self.combine_fn.fn(*left, *right)
            out = out if isinstance(out, tuple) else (out,)
            pairs = left[0].handle.data.shape
            data = [np.ascontiguousarray(np.broadcast_to(np.asarray(
                o.handle.data if isinstance(o, tl.core.tensor) else o, dtype=d.dtype), pairs))
                for o, d in zip(out, data)]
        ret = []
        for d, t in zip(data, dtypes):
            if self.keep_dims:
                if original_axis is None:
                    d = d.reshape((1,) * len(shape))
            elif original_axis is None:
                d = d.reshape(()).item()
            else:
                d = np.squeeze(d, axis=axis)
            ret.append(self.to_tensor(d, t))
        return ret

    ops._fold = ops.generic_reduce
    ops.generic_reduce = tree_reduce
    ops._tree = True


def _interpreter_reuses_types():
    """Triton 3.9's interpreter rebuilds, at every operation of every program, values that depend
    on types alone: the numpy dtype of a Triton dtype (a dict built per call), a block type per
    scalar splat (`with_element_ty`: shape validation, a name string), and the broadcast of two
    blocks of one shape (a no-op, reached through shape lists). Memoised or short-cut here, each
    returning what the original returns: about a sixth of an interpreted kernel's time (loop
    path, 15 rows, best of 6 calls, three alternated runs: 0.63-0.71 -> 0.52-0.57 s a call).
    Each patch stands down if its target is not there."""
    try:
        import triton.language as tl
        from triton.language import semantic
        from triton.runtime import interpreter
    except ImportError:
        return
    np_dtype = getattr(interpreter, "_get_np_dtype", None)
    if np_dtype is not None and not getattr(np_dtype, "_memo", False):
        memo = {}

        def get_np_dtype(tt_dtype):
            try:
                return memo[tt_dtype]
            except KeyError:
                memo[tt_dtype] = out = np_dtype(tt_dtype)
                return out
            except TypeError:  # an unhashable type (a pointer type)
                return np_dtype(tt_dtype)

        get_np_dtype._memo = True
        interpreter._get_np_dtype = get_np_dtype

    block_type = getattr(tl.core, "block_type", None)
    with_elt = getattr(block_type, "with_element_ty", None)
    if with_elt is not None and not getattr(with_elt, "_memo", False):
        types = {}

        def with_element_ty(self, scalar_ty):
            try:
                key = (scalar_ty, self.shape)
                out = types.get(key)
            except TypeError:
                return with_elt(self, scalar_ty)
            if out is None:
                out = types[key] = with_elt(self, scalar_ty)
            return out

        with_element_ty._memo = True
        block_type.with_element_ty = with_element_ty

    sem = getattr(semantic, "TritonSemantic", None)
    broadcast = getattr(sem, "broadcast_impl_value", None)
    if broadcast is not None and not getattr(broadcast, "_memo", False):
        def broadcast_impl_value(self, lhs, rhs):
            lt, rt = lhs.type, rhs.type
            if lt.is_block() and rt.is_block() and lt.shape == rt.shape:
                return lhs, rhs  # what the original returns for two blocks of one shape
            return broadcast(self, lhs, rhs)

        broadcast_impl_value._memo = True
        sem.broadcast_impl_value = broadcast_impl_value


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpreter_rounds_bf16_to_nearest_even()
    _interpreter_patches_the_language_once_a_launch()
    _interpreter_reduces_as_a_tree()
    _interpreter_reuses_types()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Under pytest-xdist (`make test`) each worker gets its share of the cores for torch's intra-op
# threads (and the native backend's pool, which follows torch): two workers of two threads each
# on two cores made every multi-threaded op wait on the other worker (OpenMP spins), and the
# native tests ran 5x slower than alone. Tests that need a thread count set their own.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (_cores or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# atol of the pass rule, per input dtype: the floor under `2 * |torch_same_dtype - ref64|` where
# that error happens to be ~0 (e.g. a loss that float32 gets exactly right by luck). It is an
# absolute floor for values of order 1 and scales with the reference's magnitude above that
# (a statistic of 40 has a float32 spacing of 4e-6: 1e-6 absolute would ask for sub-ulp luck).
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, with equal infinities counted as 0 and NaN where the other is not NaN
    counted as inf."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & (a == b)
    diff = (a - b).abs()
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max()) if diff.numel() else 0.0


def assert_pass_rule(impl_val, same_val, ref64_val, dtype, what: str) -> None:
    """|impl - ref64| <= 2 * |torch_same_dtype - ref64| + atol[dtype] (flash-attention's rule)."""
    err = max_err(impl_val, ref64_val)
    base = max_err(same_val, ref64_val)
    ref = ref64_val.detach().double().abs()
    ref = ref[torch.isfinite(ref)]
    atol = ATOL[dtype] * max(1.0, float(ref.max()) if ref.numel() else 1.0)
    bound = 2 * base + atol
    assert err <= bound, f"{what}: |impl - ref64| = {err:.3g} > 2 * {base:.3g} + {atol:g}"


try:  # CI runs the property tests on a fixed sequence of examples (reproducible runs)
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:
    pass


def matrix(*axes, slow_if=None):
    """Every combination of the axes' values as pytest params (ids joined by "-"), those for which
    ``slow_if(*values)`` holds marked ``slow``. An axis is a list of plain values or of pytest
    params (their values, ids and marks kept; a param of several values fills several argnames).
    For a cross product that the Triton interpreter makes slow (seconds a case): the default run
    keeps a covering part of it, the slow run the rest."""
    def norm(axis):
        out = []
        for v in axis:
            if isinstance(v, type(pytest.param(0))):
                out.append((tuple(v.values), v.id if v.id is not None else
                            "-".join(map(str, v.values)), list(v.marks)))
            else:
                out.append(((v,), getattr(v, "__name__", str(v)), []))
        return out

    cases = []
    for combo in itertools.product(*map(norm, axes)):
        values = [x for c in combo for x in c[0]]
        marks = [m for c in combo for m in c[2]]
        if slow_if is not None and slow_if(*values):
            marks.append(pytest.mark.slow)
        cases.append(pytest.param(*values, id="-".join(c[1] for c in combo), marks=marks))
    return cases


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: OpenMP threads only add stalls on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _module_fixture_group(item):
    """The module's file when the test uses a module-scoped fixture defined in that module (a
    launch of ranks, a compile, lm_eval runs): under pytest-xdist (`make test`: -n, --dist
    loadgroup) such a module runs on one worker, so the fixture runs once, not once a worker."""
    module = item.nodeid.split("::", 1)[0]
    info = getattr(item, "_fixtureinfo", None)
    for defs in getattr(info, "name2fixturedefs", {}).values():
        if any(d.scope != "function" and d.baseid == module for d in defs):
            return module
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("xdist"):
        for item in items:
            group = _module_fixture_group(item)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(group))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
