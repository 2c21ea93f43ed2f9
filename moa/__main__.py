from moa.cli import main

raise SystemExit(main())
