"""The training engine's library: config, run plan, build, steps, losses, phases, models, metrics, checkpoints.

Its commands (engine-run, demo, sweeps, reports, export, predict, eval) live in ``engine.commands``."""
