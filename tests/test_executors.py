"""Serial, process-pool and Dask LocalCluster runs give byte-identical results.json."""
from __future__ import annotations

import pytest

from crashsim.results import dumps
from crashsim.runner import run_one
from crashsim.scenario import load_scenario

SCENARIO = """\
name: executors
device: {cache: {destage: random}}
writer: {kind: wal, defects: [commit-before-data-flush]}
workload:
  image: {virtual_size: 1MiB, log_size: 1MiB}
  ops:
    - log_write: {offset: 0, length: 2KiB, pattern: 0xa1}
    - log_write: {offset: 1KiB, length: 2KiB, pattern: 0xb2}
explore: {seed: 9, max_states_per_step: 32}
expect: {violations: [mixed]}
"""


def test_serial_process_and_dask_results_are_identical(tmp_path):
    pytest.importorskip("dask.distributed")
    path = tmp_path / "executors.yaml"
    path.write_text(SCENARIO)
    sc = load_scenario(path)
    serial = dumps(run_one(sc, str(path), workers=1))
    pool = dumps(run_one(sc, str(path), workers=2))
    dask = dumps(run_one(sc, str(path), workers=2, executor="dask"))
    assert serial == pool
    assert serial == dask
    assert '"mixed": 0' not in serial


def test_chunks_go_out_interleaved_so_each_worker_keeps_neighbouring_steps():
    from crashsim.explore import _interleaved, chunks
    parts = chunks(12, 2)  # six chunks of two: the shares are chunks 0-2 and 3-5
    order = _interleaved(parts, 2)
    assert order == [parts[0], parts[3], parts[1], parts[4], parts[2], parts[5]]
    assert sorted(p for part in order for p in part) == list(range(12))
