from fastlane.cli import main

raise SystemExit(main())
