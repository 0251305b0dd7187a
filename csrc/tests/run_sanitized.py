"""Runs pytest with fastlane._engine taken from a sanitizer build (`make asan`).

Usage: python csrc/tests/run_sanitized.py BUILD_DIR [pytest args...]

BUILD_DIR holds fastlane/_engine*.so (build.py --out BUILD_DIR). Its fastlane/ is put in front of
the package's search path, so `fastlane._engine` comes from there while every other module is
the source tree's. Python must run with the ASan runtime preloaded (LD_PRELOAD, see Makefile).
Before pytest runs, the module that got imported is checked: it must be the one in BUILD_DIR and
it must carry ASan instrumentation, so the run can never test the plain in-place build instead.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    build = Path(sys.argv[1]).resolve()
    import fastlane

    fastlane.__path__.insert(0, str(build / "fastlane"))
    import fastlane._engine as eng

    so = Path(eng.__file__).resolve()
    if build not in so.parents:
        print(f"run_sanitized: fastlane._engine is {so}, not from {build}", file=sys.stderr)
        return 2
    if b"__asan_report_load" not in so.read_bytes():
        print(f"run_sanitized: {so} has no ASan instrumentation", file=sys.stderr)
        return 2
    print(f"run_sanitized: fastlane._engine = {so} (ASan+UBSan)", flush=True)
    import pytest

    return int(pytest.main(sys.argv[2:]))


if __name__ == "__main__":
    sys.exit(main())
