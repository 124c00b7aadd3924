from attnhub.cli import main

raise SystemExit(main())
