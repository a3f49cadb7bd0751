"""`python -m scanner` is the `kscan` command."""

from scanner.commands.cli import main

raise SystemExit(main())
