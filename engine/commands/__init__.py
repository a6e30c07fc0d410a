"""The engine's applications: engine-run (``run``), the demo, sweeps, reports, export, predict, eval and
the cluster launcher. They use the library in ``engine/``; no library module imports from here."""
