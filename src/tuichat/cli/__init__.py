"""The `tuichat` command line: `main` parses and routes; one module per command group, each imported only when used."""
