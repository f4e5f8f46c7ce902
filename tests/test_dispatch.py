"""The one dispatch point: ``impl=``, then ``MUSCLE_FAST_IMPL``, then automatic; the backend table;
the native extension's contract check; no import cycle between the public layer and ops/."""
import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

import muscle_fast as mf
from muscle_fast.ops.compat_loss import backends, contract, native

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(n=3, vocab=9):
    logits = torch.randn(n, vocab, device=DEVICE)
    return (logits, torch.randint(0, vocab, (n,), device=DEVICE),
            logits + torch.randn_like(logits), logits + torch.randn_like(logits))


def test_available_impls_say_why():
    status = mf.available_impls("cpu")
    assert set(status) == {"triton", "native", "torch"} and status["torch"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason


def test_env_var_selects_and_explicit_impl_wins(monkeypatch):
    logits, labels, old, new = make_inputs()
    monkeypatch.setenv("MUSCLE_FAST_IMPL", "torch")
    a = mf.fused_compat_loss(logits, labels, old, new)
    monkeypatch.setenv("MUSCLE_FAST_IMPL", "bogus")
    with pytest.raises(ValueError, match="MUSCLE_FAST_IMPL"):
        mf.fused_compat_loss(logits, labels, old, new)
    b = mf.fused_compat_loss(logits, labels, old, new, impl="torch")
    assert torch.equal(a, b)


def test_unavailable_explicit_impl_raises_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, labels, old, new = make_inputs()
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="cannot run here: triton runs on CUDA"):
            mf.fused_compat_loss(logits, labels, old, new, impl="triton")


def test_auto_fallback_says_so_once(monkeypatch, caplog):
    from muscle_fast import _dispatch

    monkeypatch.setattr(_dispatch, "_native_status",
                        lambda: _dispatch.ImplStatus(False, "not built (test)"))
    _dispatch._say_once.cache_clear()
    logits, labels, old, new = make_inputs()
    with caplog.at_level(logging.WARNING, logger="muscle_fast"):
        for _ in range(3):
            assert _dispatch.choose_impl("auto", torch.device("cpu"), torch.float32) == "torch"
    assert sum("not built (test)" in r.getMessage() for r in caplog.records) == 1
    _dispatch._say_once.cache_clear()



def test_backend_table_names_every_impl_and_rejects_others():
    assert backends.NAMES == mf._dispatch.IMPLS
    assert backends.backend("torch").rows is None  # the reference runs instead of a row kernel
    with pytest.raises(ValueError, match="no backend named"):
        backends.backend("cuda")


@pytest.mark.skipif(not native.native_available()[0], reason="native extension not built")
def test_native_extension_matches_the_contract():
    ext = native._native
    assert native.contract_mismatch(ext) == ""
    assert (ext.N_STATS, ext.N_PARTIALS, ext.N_ROW_CONSTS) == (
        contract.N_STATS, contract.N_PARTIALS, contract.N_ROW_CONSTS)


def test_contract_check_names_what_differs():
    class Stale:
        N_STATS, N_PARTIALS, N_ROW_CONSTS = 8, 15, 8
        MASK_MODES = {"GIVEN": 0, "MUSCLE": 1}

    why = native.contract_mismatch(Stale)
    assert "N_STATS: extension 8, contract.py 9" in why and "MASK_MODES" in why
    assert "N_PARTIALS" not in why


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_ops_never_import_the_public_layer():
    """ops/ is below the public files: an import from it back up (``_dispatch``, ``loss``, ...)
    is the cycle this layout exists to prevent."""
    up = []
    for path in sorted((ROOT / "muscle_fast" / "ops").rglob("*.py")):
        for name, names in _imports(path):
            targets = [name] + [f"{name}.{n}" for n in names]
            for t in targets:
                if t.startswith("muscle_fast.") and not t.startswith("muscle_fast.ops") \
                        and t != "muscle_fast._native":
                    up.append(f"{path.relative_to(ROOT)} imports {t}")
    assert not up, "\n".join(up)


@pytest.mark.parametrize("module", [
    "muscle_fast.ops.compat_loss.native", "muscle_fast.ops.compat_loss.vocab_parallel",
    "muscle_fast.ops.compat_loss.function", "muscle_fast.ops.linear_compat_loss.function",
    "muscle_fast._dispatch", "muscle_fast.linear",
])
def test_each_module_imports_first(module):
    """Imported first in a fresh interpreter (no other module loaded before it), every module
    loads: no cycle hidden by import order."""
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_triton_36_interpreter_with_numpy_24_is_unavailable_with_reason(monkeypatch):
    triton = pytest.importorskip("triton")
    import numpy

    from muscle_fast import _dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    _dispatch._interpreter_numpy_clash.cache_clear()
    try:
        status = _dispatch._triton_status(torch.device("cpu"))
        assert not status.available and "numpy<2.4" in status.reason
        monkeypatch.setattr(numpy, "__version__", "2.3.5")
        _dispatch._interpreter_numpy_clash.cache_clear()
        assert _dispatch._triton_status(torch.device("cpu")).available
    finally:
        monkeypatch.undo()
        _dispatch._interpreter_numpy_clash.cache_clear()
