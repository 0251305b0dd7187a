"""cffi builder for the C data-plane engine (API mode, out of line).

`python build.py` compiles fastlane/_engine*.so in place (what `make build` does);
setup.py hands `ffibuilder` to setuptools so `pip install .` builds it too.
The cdef lives in csrc/engine_cdef.h so the C boundary is read in one place.
"""
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"

ffibuilder = FFI()
ffibuilder.cdef((CSRC / "engine_cdef.h").read_text())
ffibuilder.set_source(
    "fastlane._engine",
    '#include "engine.h"',
    sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=[str(CSRC)],
    extra_compile_args=["-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    import os
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=".", verbose=False)
