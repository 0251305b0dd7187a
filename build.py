"""cffi builders for the C data-plane engine (API mode, out of line).

Two modules from the same sources:
- `fastlane._engine`, the shipped one: the engine's C boundary (csrc/engine_cdef.h) and nothing
  else. setup.py hands `ffibuilder` to setuptools, so `pip install .` builds exactly this.
- `tests._engine_test`, for the test suite only: the same engine plus the test entry points
  (csrc/engine_test_cdef.h, csrc/testapi.c) that run the workers' per-packet code without I/O.
  It never ships, so those entry points are not part of the production ABI.

`python build.py` compiles both in place (what `make build` does).
`python build.py --out build/asan --cc clang --cflags "-fsanitize=..."` builds variants of both
into their own directory instead (build/asan/fastlane/_engine*.so and
build/asan/tests/_engine_test*.so), for `make asan`; the in-place modules are not touched.
"""

import argparse
import os
import shlex
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"]
LDFLAGS = ["-pthread"]
TEST_ONLY = {"testapi.c"}


def make_builder(
    extra_cflags: list[str] | None = None,
    extra_ldflags: list[str] | None = None,
    absolute: bool = False,
    test: bool = False,
) -> FFI:
    """The production module's builder, or with test=True the tests' module's."""
    # cffi compiles from inside its tmpdir: sources relative to ROOT only work for the in-place build
    ffi = FFI()
    cdef = (CSRC / "engine_cdef.h").read_text()
    if test:
        cdef += (CSRC / "engine_test_cdef.h").read_text()
    ffi.cdef(cdef)
    sources = [p for p in sorted(CSRC.glob("*.c")) if test or p.name not in TEST_ONLY]
    ffi.set_source(
        "tests._engine_test" if test else "fastlane._engine",
        '#include "engine.h"' + ('\n#include "engine_test_cdef.h"' if test else ""),
        sources=[str(p if absolute else p.relative_to(ROOT)) for p in sources],
        include_dirs=[str(CSRC)],
        extra_compile_args=CFLAGS + list(extra_cflags or []),
        extra_link_args=LDFLAGS + list(extra_ldflags or []),
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="build directory (default: in place, fastlane/ and tests/)")
    ap.add_argument("--cc", help="C compiler for this build (e.g. clang)")
    ap.add_argument("--cflags", default="", help="extra compile flags, also passed to the link")
    args = ap.parse_args()
    os.chdir(ROOT)
    if args.out is None and not args.cc and not args.cflags:
        ffibuilder.compile(tmpdir=".", verbose=False)
        make_builder(test=True).compile(tmpdir=".", verbose=False)
    else:
        if args.out is None:
            ap.error("--cc/--cflags need --out: the in-place modules are the plain build")
        if args.cc:
            os.environ["CC"] = args.cc
            os.environ.pop("LDSHARED", None)
        extra = shlex.split(args.cflags)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for test in (False, True):
            print(
                make_builder(extra, extra, absolute=True, test=test).compile(
                    tmpdir=str(out), verbose=False
                )
            )
