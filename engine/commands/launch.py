"""``python -m engine.commands.launch [torchrun options] -m engine.commands.run ...``: torchrun, for clusters.

It takes torchrun's options unchanged and differs in two ways (docs/CLUSTERS.md):

- SIGUSR1 (SLURM's pre-emption warning) is forwarded to the workers along with torchrun's default
  signals, unless ``--signals-to-handle`` is given;
- the exit status says what happened: 128 + the signal when the job was stopped by one (torchrun
  itself exits 1 with a traceback), the first failing worker's own status when one failed (2 for a
  bad option, 3 for a non-finite loss, 128 + N for a worker killed by signal N), 0 otherwise.

``engine-run --gpus N`` re-launches itself through this module.
"""

from __future__ import annotations

import sys

from engine.distributed import LAUNCHER_SIGNALS


def with_forwarded_signals(argv: list[str]) -> list[str]:
    """``argv`` with ``--signals-to-handle`` set to ``LAUNCHER_SIGNALS`` unless the caller chose."""
    chosen = any(arg.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for arg in argv)
    return argv if chosen else [f"--signals-to-handle={LAUNCHER_SIGNALS}", *argv]


def exit_status(exitcode: int) -> int:
    """A worker's exit code as a shell status: negative codes are deaths by signal."""
    return 128 - exitcode if exitcode < 0 else exitcode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(with_forwarded_signals(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except SignalException as stopped:  # the workers got the signal too and were waited for
        print(f"engine.commands.launch: stopped by {stopped.sigval.name}", file=sys.stderr)
        return 128 + int(stopped.sigval)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        print(f"engine.commands.launch: rank {rank} failed with exit code {failure.exitcode}", file=sys.stderr)
        return exit_status(failure.exitcode) or 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
