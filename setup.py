"""Builds the native extension ``muscle_fast._native`` through CMakeLists.txt (cmake + ninja).

Metadata lives in pyproject.toml. Without a working compiler or cmake the package still installs
(pure Python; the dispatcher falls back to impl="torch" and says so), unless
MUSCLE_FAST_REQUIRE_NATIVE=1. MUSCLE_FAST_SANITIZE=1 builds with ASan + UBSan;
MUSCLE_FAST_CMAKE_ARGS adds cmake arguments.
"""

import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
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
        build_temp = Path(self.build_temp).resolve() / "cmake"
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


setup(ext_modules=[CMakeExtension("muscle_fast._native")], cmdclass={"build_ext": CMakeBuild})
