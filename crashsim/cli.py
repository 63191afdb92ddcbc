"""The ``crashsim`` command: run scenarios, replay one state, inspect VHDX images, bench.

Exit codes: 0 every scenario met its expectation; 1 one did not; 2 usage or input
error; 3 internal error; 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from .errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, InputError

MAX_WORKERS = 1024
MAX_MEMORY_MIB = 1 << 24


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"crashsim: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("crashsim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception:
        traceback.print_exc()
        print("crashsim: internal error (a bug in crashsim; please report it with the "
              "traceback above)", file=sys.stderr)
        return EXIT_INTERNAL


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and exit 2, like every other bad input: argparse's own
    prints the whole usage block above it. Subcommands inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INPUT, f"crashsim: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="crashsim", description="Crash-consistency fault "
                "injection for storage code.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="explore the crash states of scenarios and report")
    run.add_argument("scenarios", nargs="+", type=Path)
    run.add_argument("--out", type=Path, default=Path("reports"))
    run.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, MAX_WORKERS))
    run.add_argument("--seed", type=int, default=None,
                     help="override every scenario's explore.seed")
    run.add_argument("--executor", choices=["process", "dask"], default="process")
    run.add_argument("--scheduler", default=None, help="dask scheduler address")
    run.add_argument("--resume", action="store_true",
                     help="finish an interrupted run into the same --out: reuse its saved "
                          "crash points, skip scenarios it finished")
    run.add_argument("--max-memory-mib", type=int, default=None, metavar="N",
                     help="override every scenario's explore.max_memory_mib (resident "
                          "memory per exploring process; past it the rest is skipped)")
    run.set_defaults(func=_cmd_run)

    rp = sub.add_parser("replay", help="rebuild one crash state, recover it, show verdict")
    rp.add_argument("state_id")
    rp.add_argument("--scenario", type=Path, required=True)
    rp.add_argument("--seed", type=int, default=None,
                    help="the explore.seed the run used, if run --seed overrode it")
    rp.add_argument("--write-image", type=Path, default=None,
                    help="also write the crashed (unrecovered) image to this file")
    rp.set_defaults(func=_cmd_replay)

    try:
        from . import vhdx_cli
        vhdx_cli.add_parser(sub)
    except ImportError:  # the VHDX tools are part of the package; this guards partial installs
        pass
    from . import fuzz
    fuzz.add_parser(sub)

    bench = sub.add_parser("bench", help="run the standard benchmark")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--quick", action="store_true", help="smaller workload")
    bench.set_defaults(func=_cmd_bench)
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from .interrupt import sigterm_as_interrupt
    from .runner import run_scenarios
    if not 1 <= args.workers <= MAX_WORKERS:
        # each is a process forked at once, with its share of the lanes in shared
        # memory: --workers 1000000000000 died allocating them (exit 3)
        raise InputError(f"--workers must be from 1 to {MAX_WORKERS}, got {args.workers}")
    if args.max_memory_mib is not None and not 1 <= args.max_memory_mib <= MAX_MEMORY_MIB:
        # the range a scenario's explore.max_memory_mib is held to
        raise InputError(f"--max-memory-mib must be from 1 to {MAX_MEMORY_MIB} (16 TiB), "
                         f"got {args.max_memory_mib}")
    if args.scheduler and args.executor != "dask":
        raise InputError("--scheduler is the address of a Dask scheduler: add "
                         "--executor dask, or drop --scheduler to run on this machine")
    if args.executor == "dask":
        from .dask_executor import require_dask
        require_dask()
    with sigterm_as_interrupt():  # a killed CI job keeps its partial report too
        return run_scenarios(args.scenarios, out_dir=args.out, workers=args.workers,
                             seed=args.seed, executor=args.executor,
                             scheduler=args.scheduler, resume=args.resume,
                             max_memory_mib=args.max_memory_mib)


def _cmd_replay(args: argparse.Namespace) -> int:
    from .runner import replay_state
    return replay_state(args.state_id, args.scenario, args.write_image, args.seed)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    return run_bench(as_json=args.json, quick=args.quick)


if __name__ == "__main__":
    # Run through the package so exception classes are the package's own, not __main__'s.
    from crashsim.cli import main as package_main
    sys.exit(package_main())
