"""Dataset sources: each turns a dataset layout into ``SourceItem`` lists for ``shards.writer``."""
