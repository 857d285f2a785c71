from mochi.cli import main

raise SystemExit(main())
