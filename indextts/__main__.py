from indextts.cli import main

raise SystemExit(main())
