"""Runs pytest with fastlane._engine taken from a sanitizer build (`make asan`).

Usage: python csrc/tests/run_sanitized.py BUILD_DIR [pytest args...]

BUILD_DIR holds fastlane/_engine*.so and tests/_engine_test*.so (build.py --out BUILD_DIR). Its
fastlane/ and tests/ are put in front of those packages' search paths, so both engine modules come
from there while every other module is the source tree's. Python must run with the ASan runtime preloaded (LD_PRELOAD, see Makefile).
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
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the tree's fastlane and tests
    import importlib

    import fastlane
    import tests

    # both engine modules: the shipped one and the tests' one (with the test entry points)
    fastlane.__path__.insert(0, str(build / "fastlane"))
    tests.__path__.insert(0, str(build / "tests"))
    for name in ("fastlane._engine", "tests._engine_test"):
        so = Path(importlib.import_module(name).__file__ or "").resolve()
        if build not in so.parents:
            print(f"run_sanitized: {name} is {so}, not from {build}", file=sys.stderr)
            return 2
        if b"__asan_report_load" not in so.read_bytes():
            print(f"run_sanitized: {so} has no ASan instrumentation", file=sys.stderr)
            return 2
        print(f"run_sanitized: {name} = {so} (ASan+UBSan)", flush=True)
    import pytest

    return int(pytest.main(sys.argv[2:]))


if __name__ == "__main__":
    sys.exit(main())
