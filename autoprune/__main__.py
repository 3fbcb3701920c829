from autoprune.cli import main

raise SystemExit(main())
