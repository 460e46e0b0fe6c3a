"""The loop and its mechanics. Nothing here imports the CLI or the config package."""
