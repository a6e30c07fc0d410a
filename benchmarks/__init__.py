"""Benchmarks and demos of the parts: the top layer, importing shards, pipelines and engine, never imported by them."""
