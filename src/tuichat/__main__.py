"""Lets `python -m tuichat` behave exactly like the `tuichat` command."""

from tuichat.cli.main import main

raise SystemExit(main())
