"""Exploring on a Dask cluster: the path for users who outgrow one machine.

Each chunk of crash points is one task. The scenario and its recorded trace are
scattered to the workers once; each worker builds its context (writer, model, judge)
once per process and reuses it. Results come back in chunk order, so they are identical
to a serial run.
"""
from __future__ import annotations

from typing import Iterator

from .scenario import Scenario
from .trace import Trace

_CONTEXTS: dict[str, object] = {}


def _explore_chunk(scenario: Scenario, trace: Trace, steps: list[int]):
    from .explore import build_context, explore_steps
    key = scenario.digest()
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = _CONTEXTS[key] = build_context(scenario, trace)
    return explore_steps(ctx, steps)


def map_chunks(scenario: Scenario, trace: Trace, parts: list[list[int]],
               scheduler: str | None, workers: int) -> Iterator[list]:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise RuntimeError("the dask executor needs the optional extra: "
                           "pip install 'crashsim[dask]'") from None
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1,
                               processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        sc_f, tr_f = client.scatter([scenario, trace], broadcast=True)
        futures = [client.submit(_explore_chunk, sc_f, tr_f, part, pure=False)
                   for part in parts]
        for fut in futures:
            yield fut.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
