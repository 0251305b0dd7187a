"""cffi builder for the C data-plane engine (API mode, out of line).

`python build.py` compiles fastlane/_engine*.so in place (what `make build` does);
setup.py hands `ffibuilder` to setuptools so `pip install .` builds it too.
The cdef lives in csrc/engine_cdef.h so the C boundary is read in one place.

`python build.py --out build/asan --cc clang --cflags "-fsanitize=..."` builds a variant into
its own directory instead (build/asan/fastlane/_engine*.so), for `make asan`; the in-place
module is not touched.
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


def make_builder(extra_cflags: list[str] | None = None, extra_ldflags: list[str] | None = None,
                 absolute: bool = False) -> FFI:
    # cffi compiles from inside its tmpdir: sources relative to ROOT only work for the in-place build
    ffi = FFI()
    ffi.cdef((CSRC / "engine_cdef.h").read_text())
    ffi.set_source(
        "fastlane._engine",
        '#include "engine.h"',
        sources=[str(p if absolute else p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.c"))],
        include_dirs=[str(CSRC)],
        extra_compile_args=CFLAGS + list(extra_cflags or []),
        extra_link_args=LDFLAGS + list(extra_ldflags or []),
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="build directory (default: in place, fastlane/_engine*.so)")
    ap.add_argument("--cc", help="C compiler for this build (e.g. clang)")
    ap.add_argument("--cflags", default="", help="extra compile flags, also passed to the link")
    args = ap.parse_args()
    os.chdir(ROOT)
    if args.out is None and not args.cc and not args.cflags:
        ffibuilder.compile(tmpdir=".", verbose=False)
    else:
        if args.out is None:
            ap.error("--cc/--cflags need --out: the in-place module is the plain build")
        if args.cc:
            os.environ["CC"] = args.cc
            os.environ.pop("LDSHARED", None)
        extra = shlex.split(args.cflags)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        print(make_builder(extra, extra, absolute=True).compile(tmpdir=str(out), verbose=False))
