#!/usr/bin/env python
"""Convert a dataset into WebDataset shards; see ``python tools/make_shards.py --help``."""

from shards.cli import main

if __name__ == "__main__":
    main()
