"""`python -m fastlane.bench` = `fastlane bench` (used by the tests, works without the CLI)."""

from fastlane.bench import main

raise SystemExit(main())
