"""Exploring on a Dask cluster: the path for users who outgrow one machine.

Each chunk of crash points is one task. The scenario and its recorded trace are
scattered to the workers once; each worker builds its context (writer, model, judge)
once per process and reuses it. Results come back in chunk order, so they are identical
to a serial run.
"""
from __future__ import annotations

import importlib.util
from concurrent.futures import CancelledError
from typing import Iterator

from .errors import InputError
from .scenario import Scenario
from .trace import Trace

# The context of the run this worker last judged for. Kept only for the very scenario
# and trace objects scattered for that run: a long-lived worker on a shared scheduler
# sees later runs too, and a trace recorded at run time differs from run to run under
# the same scenario hash (QEMU writes fresh GUIDs), so a context kept by hash judged a
# later run's chunks against an earlier run's trace. One slot also bounds its memory.
_CONTEXT: tuple[Scenario, Trace, object] | None = None


def _explore_chunk(scenario: Scenario, trace: Trace, steps: list[int]):
    global _CONTEXT
    from .explore import build_context, judge_steps
    if _CONTEXT is None or _CONTEXT[0] is not scenario or _CONTEXT[1] is not trace:
        _CONTEXT = (scenario, trace, build_context(scenario, trace))
    return judge_steps(_CONTEXT[2], steps)  # under the scenario's memory cap, per worker


def require_dask() -> None:
    """An input error, before any work, when the optional extra is not installed."""
    if importlib.util.find_spec("distributed") is None:
        raise InputError("--executor dask needs the optional extra: "
                         "pip install 'crashsim[dask]'")


def map_chunks(scenario: Scenario, trace: Trace, parts: list[list[int]],
               scheduler: str | None, workers: int
               ) -> Iterator[tuple[list[int], list | None]]:
    """(chunk, its results) in chunk order; None for a chunk whose worker died (dask
    gives up on a task after ``distributed.scheduler.allowed-failures`` deaths) or that
    dask cancelled when the data it needed died with a worker."""
    require_dask()
    from dask.distributed import Client, LocalCluster
    from distributed.scheduler import KilledWorker
    cluster = None
    if scheduler:
        try:
            client = Client(scheduler)
        except (OSError, ValueError) as exc:  # refused, timed out, or not an address
            raise InputError(f"--scheduler {scheduler}: cannot connect ({exc}); start "
                             f"one with 'dask scheduler' and give the address it "
                             f"prints") from None
    else:
        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1,
                               processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        sc_f, tr_f = client.scatter([scenario, trace], broadcast=True)
        futures = [client.submit(_explore_chunk, sc_f, tr_f, part, pure=False)
                   for part in parts]
        for part, fut in zip(parts, futures):
            try:
                yield part, fut.result()
            except (KilledWorker, CancelledError):  # cancelled: its data died with a worker
                yield part, None
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
