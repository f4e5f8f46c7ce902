"""Builds the native extension ``muscle_fast._native`` through CMakeLists.txt (cmake + ninja).

Metadata lives in pyproject.toml. Without a working compiler or cmake the package still installs
(pure Python; the dispatcher falls back to impl="torch" and says so), unless
MUSCLE_FAST_REQUIRE_NATIVE=1. MUSCLE_FAST_SANITIZE=1 builds with ASan + UBSan;
MUSCLE_FAST_CMAKE_ARGS adds cmake arguments. MUSCLE_FAST_NO_NATIVE=1 builds the pure-Python
(py3-none-any) wheel. MUSCLE_FAST_ZIG_TARGET=x86_64-linux-gnu.2.17 compiles with the C++
compiler of the `ziglang` package for that glibc (the manylinux wheel; see docs/wheels.md).
"""

import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(name: str, module: str):
    """Path of a build tool: on PATH, else from its pip package (cmake, ninja wheels)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        mod = __import__(module)
        cand = Path(mod.BIN_DIR) / name
        return str(cand) if cand.exists() else None
    except Exception:  # noqa: BLE001 - any failure means: not available
        return None


def _zig_compiler(build_temp: Path, target: str) -> str:
    """A `c++` for cmake that runs `python -m ziglang c++ -target TARGET` (static libc++)."""
    try:
        import ziglang  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("MUSCLE_FAST_ZIG_TARGET is set but `ziglang` is not installed") from exc
    wrapper = build_temp / f"zig-c++-{target}"
    wrapper.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m ziglang c++ -target {target} "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extensions(self):
        built = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
                built.append(ext)
            except Exception as exc:  # no compiler, no cmake, a failed compile
                if os.environ.get("MUSCLE_FAST_REQUIRE_NATIVE") == "1":
                    raise
                stale = Path(self.get_ext_fullpath(ext.name))
                if stale.exists():  # an earlier build's output must not ship as this one's
                    stale.unlink()
                msg = (
                    f"muscle_fast: building {ext.name} failed ({exc}); installing without the "
                    "native CPU backend (impl='torch' is used on the CPU instead)"
                )
                warnings.warn(msg)
                print(msg, file=sys.stderr)
        self.extensions[:] = built

    def build_extension(self, ext):
        cmake = _tool("cmake", "cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        zig_target = os.environ.get("MUSCLE_FAST_ZIG_TARGET")
        # one cmake tree per compiler: switching reuses no cache or objects of the other
        tree = f"cmake-zig-{zig_target}" if zig_target else "cmake"
        build_temp = Path(self.build_temp).resolve() / tree
        build_temp.mkdir(parents=True, exist_ok=True)
        sanitize = os.environ.get("MUSCLE_FAST_SANITIZE", "0") == "1"
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMUSCLE_FAST_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'RelWithDebInfo' if sanitize else 'Release'}",
            f"-DMUSCLE_FAST_SANITIZE={'ON' if sanitize else 'OFF'}",
        ]
        ninja = _tool("ninja", "ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if zig_target:
            args.append(f"-DCMAKE_CXX_COMPILER={_zig_compiler(build_temp, zig_target)}")
        args += shlex.split(os.environ.get("MUSCLE_FAST_CMAKE_ARGS", ""))
        configure = [cmake, "-S", str(ROOT), "-B", str(build_temp)] + args
        if subprocess.call(configure) != 0:
            # a cache from another configuration (compiler, generator) cannot be reused
            shutil.rmtree(build_temp)
            build_temp.mkdir(parents=True)
            subprocess.check_call(configure)
        subprocess.check_call([cmake, "--build", str(build_temp), "--target", "_native"])
        built = Path(self.get_ext_fullpath(ext.name)).resolve()
        if not built.exists():
            raise RuntimeError(f"cmake did not produce {built}")


NO_NATIVE = os.environ.get("MUSCLE_FAST_NO_NATIVE") == "1"
setup(
    # benchmarks/ stays a top-level folder of the repository; in the wheel it is
    # muscle_fast._benchmarks, which `muscle-fast bench` runs
    packages=find_packages(include=["muscle_fast", "muscle_fast.*"]) + ["muscle_fast._benchmarks"],
    package_dir={"muscle_fast._benchmarks": "benchmarks"},
    ext_modules=[] if NO_NATIVE else [CMakeExtension("muscle_fast._native")],
    cmdclass={"build_ext": CMakeBuild},
    # pip's isolated build environment gets the compiler only when it is asked for
    setup_requires=["ziglang"] if os.environ.get("MUSCLE_FAST_ZIG_TARGET") else [],
)
