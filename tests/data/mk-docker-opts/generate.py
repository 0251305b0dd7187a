"""Regenerate cases.json and expected/ from flannel's own dist/mk-docker-opts.sh.

Usage: .venv/bin/python tests/data/mk-docker-opts/generate.py /path/to/flannel/dist/mk-docker-opts.sh

The script itself is not part of this repository; get it from flannel's repository at the
version named in README.md. Every case (tests/test_dockeropts.py:CASES) runs under dash and
under `bash --posix` (the script is `#!/bin/sh`: dash on Debian, bash in POSIX mode on RHEL;
plain `bash script` would also list the usage() function in `set` and corrupt the output); the two must agree, and
what they did becomes the fixture.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/

from test_dockeropts import CASES, run_case


def main() -> int:
    script = Path(sys.argv[1]).resolve()
    expected = HERE / "expected"
    expected.mkdir(exist_ok=True)
    for old in expected.glob("*.env"):
        old.unlink()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            dash = run_case(["dash", str(script)], case, Path(tmp) / case.id / "dash")
            bash = run_case(["bash", "--posix", str(script)], case, Path(tmp) / case.id / "bash")
            same = dash["exit"] == bash["exit"] and dash["output"] == bash["output"]
            if case.compare_stderr:
                same = same and dash["stderr"] == bash["stderr"]
            if not same:
                print(f"{case.id}: dash and bash disagree:\n{dash}\n{bash}", file=sys.stderr)
                return 1
            (expected / f"{case.id}.env").write_text(dash["output"])
            records.append({"id": case.id, "exit": dash["exit"], "output": f"{case.id}.env",
                            "stderr": dash["stderr"] if case.compare_stderr else None})
    (HERE / "cases.json").write_text(json.dumps(records, indent=1) + "\n")
    print(f"{len(records)} cases written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
