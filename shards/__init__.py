"""The shard format: sample schema, writer, manifest, index files, verification and dataset sources."""
