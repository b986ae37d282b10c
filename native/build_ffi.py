"""cffi build script for the native shim, ``dxl._dxl_native`` (API mode).

setup.py names ``native/build_ffi.py:ffibuilder`` in ``cffi_modules``, so ``pip install -e .``
compiles it. For a quick in-place build after editing C (writes ``dxl/_dxl_native*.so``)::

    python native/build_ffi.py

``DXL_SANITIZE=1`` builds it with AddressSanitizer and UndefinedBehaviorSanitizer (any finding
aborts), and ``DXL_NATIVE_TARGET`` names where the in-place build writes the module:
``make test-sanitize`` builds such a copy apart from the normal one and runs the native and fuzz
tests against it.

``dxl.h`` is the cdef, read verbatim: the C API is declared once.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _version() -> str:
    """The project version, from pyproject.toml, so that the .so and the package cannot drift."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise RuntimeError('no version = "..." line in pyproject.toml')
    return match.group(1)


HAS_CMA = 1 if sys.platform.startswith("linux") else 0

# Defined in the preamble below (not in dxl.h, which the C files also include and where these
# definitions would be duplicated in every object); declared here, next to their definitions.
BUILD_CONSTANTS_CDEF = """
static const int DXL_HAS_CMA;
static const char DXL_VERSION[];
"""

PREAMBLE = f"""
#include <stdint.h>
#include "dxl.h"

static const int DXL_HAS_CMA = {HAS_CMA};
static const char DXL_VERSION[] = "{_version()}";
"""

# Warnings fail the build in CI and development (DXL_WERROR=1), but not for users, whose
# compiler or cffi version may warn about code generated outside this project.
WERROR = ["-Werror"] if os.environ.get("DXL_WERROR") == "1" else []

# ASan + UBSan (make test-sanitize): -O1 -g keep reports readable, and undefined behaviour is
# fatal like a memory error, so a finding fails the test that hit it.
SANITIZE = (
    [
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
        "-g",
        "-O1",
    ]
    if os.environ.get("DXL_SANITIZE") == "1"
    else []
)

# The in-place build's file name: the one setuptools gives it (cffi builds for the stable ABI).
INPLACE_NAME = "_dxl_native.abi3.so"


def make_builder(*, absolute_paths: bool = False) -> FFI:
    """The FFI builder. setuptools wants source paths relative to setup.py's directory (the
    working directory of a pip build); ``FFI.compile`` changes directory, so it needs absolute
    ones."""

    def path(p: Path) -> str:
        return str(p) if absolute_paths else p.relative_to(ROOT).as_posix()

    builder = FFI()
    builder.cdef((HERE / "dxl.h").read_text(encoding="utf-8"))
    builder.cdef(BUILD_CONSTANTS_CDEF)
    builder.set_source(
        "dxl._dxl_native",
        PREAMBLE,
        sources=[path(p) for p in sorted(HERE.glob("dxl_*.c"))],
        include_dirs=[path(HERE)],
        define_macros=[("_GNU_SOURCE", "1")],
        extra_compile_args=["-O2", "-pthread", "-Wall", "-Wextra", *WERROR, *SANITIZE],
        extra_link_args=["-pthread", *SANITIZE[:1]],
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    # Objects and generated C go to build/ (ignored). The module lands next to dxl/_ffi.py under
    # the name an editable install gives it, so a stale copy of one can never shadow the other.
    # A sanitizer build keeps its objects apart: distutils would reuse the plain ones.
    make_builder(absolute_paths=True).compile(
        tmpdir=str(ROOT / "build" / ("cffi-sanitize" if SANITIZE else "cffi")),
        target=os.environ.get("DXL_NATIVE_TARGET") or str(ROOT / "dxl" / INPLACE_NAME),
        verbose=True,
    )
