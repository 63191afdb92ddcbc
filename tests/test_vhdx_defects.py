"""The vhdx writer's defect switches and the vhdx-2013 / vhdx-qemu kinds, found by crashsim.

Each defect scenario must report its expected violation classes, and the clean writer
must pass the very same workload (so the violations come from the defect, not from the
workload or the simulator).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from crashsim.runner import run_one
from crashsim.scenario import Scenario, load_scenario
from crashsim.writers import load_writer_class
from crashsim.writers.vhdx.format import LOG_SECTOR
from crashsim.writers.vhdx.variants import merge_2013, zero_filled_updates
from crashsim.writers.vhdx.writer import VhdxWriter

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
DEFECTS = sorted(VhdxWriter.defects_available)


def _found(sc: Scenario, path: Path) -> set[str]:
    return set(run_one(sc, str(path))["violation_classes_found"])


@lru_cache(maxsize=None)
def _clean_found(path: Path) -> frozenset[str]:
    sc = load_scenario(path)
    clean = sc.model_copy(update={"writer": sc.writer.model_copy(update={"defects": []})})
    return frozenset(_found(clean, path))


def test_every_defect_has_a_scenario():
    assert len(DEFECTS) >= 10
    for name in DEFECTS:
        sc = load_scenario(SCENARIOS / f"vhdx-defect-{name}.yaml")
        assert sc.writer.kind == "vhdx" and sc.writer.defects == [name]


@pytest.mark.parametrize("name", DEFECTS)
def test_defect_is_found_and_clean_writer_passes(name):
    path = SCENARIOS / f"vhdx-defect-{name}.yaml"
    sc = load_scenario(path)
    assert set(sc.expected_violations) <= _found(sc, path)
    assert _clean_found(path) == frozenset()


@pytest.mark.parametrize("kind, scenario, found", [
    ("vhdx-qemu", "vhdx-qemu-alloc.yaml", "stuck"),
    ("vhdx-2013", "vhdx-2013-alloc.yaml", "mixed"),
])
def test_protocol_kinds(kind, scenario, found):
    assert load_writer_class(kind).kind == kind
    sc = load_scenario(SCENARIOS / scenario)
    # the same workload passes on the fixed writer (vhdx-alloc-512.yaml, run by the CLI)
    assert sc.workload == load_scenario(SCENARIOS / "vhdx-alloc-512.yaml").workload
    assert found in _found(sc, SCENARIOS / scenario)


def test_unknown_defect_is_one_clear_error():
    with pytest.raises(ValueError, match="has no defect 'nope'"):
        VhdxWriter(ops=[], image={}, defects=["nope"], seed=1)


class _FakeIO:
    def __init__(self, blob: bytes):
        self.blob = blob

    def read(self, offset: int, n: int) -> bytes:
        return self.blob[offset:offset + n]


def test_2013_trailing_merge_shifts_the_sector():
    old = bytes(range(256)) * 16  # one 4 KiB sector
    [u] = merge_2013(_FakeIO(old), 0, b"N" * 8)
    assert u.file_offset == 0 and len(u.data) == LOG_SECTOR
    assert u.data[:8] == b"N" * 8 and u.data[8:] == old[:LOG_SECTOR - 8]


def test_2013_leading_merge_is_correct():
    old = bytes(range(256)) * 16
    [u] = merge_2013(_FakeIO(old), 8, b"N" * 8)
    assert u.data == old[:8] + b"N" * 8 + old[16:]


def test_zero_filled_merge_drops_neighbours():
    [u] = zero_filled_updates(LOG_SECTOR + 8, b"N" * 8)
    assert u.file_offset == LOG_SECTOR
    assert u.data == bytes(8) + b"N" * 8 + bytes(LOG_SECTOR - 16)
