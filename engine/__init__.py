"""The training engine: methods, MILe phase machine, captured steps, metrics, checkpoints, CLI."""
