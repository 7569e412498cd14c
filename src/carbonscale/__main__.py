from carbonscale.cli import main

raise SystemExit(main())
