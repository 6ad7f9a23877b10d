"""The `tombstone-sidecar` command: one module per subcommand, `main` dispatches."""
