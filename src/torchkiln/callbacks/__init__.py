"""Built-in callbacks: the monitor and early stopping, checkpointing, freezing, progress, logging."""
