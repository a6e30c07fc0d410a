"""The error every shard-folder problem raises (kept apart so low-level modules can share it)."""


class ShardError(Exception):
    """A shard folder that does not match its manifest; the message names the file at fault."""


def with_filename(error: OSError, path: object) -> OSError:
    """``error`` naming ``path`` when it names no file (a write's ENOSPC does not), so the message
    the command line prints says which file, and so which disk, is at fault."""
    if error.filename is not None:
        return error
    return OSError(error.errno, error.strerror or str(error), str(path))
