"""The coordinator: ServerApp, strategy construction, checkpoints and reports."""
