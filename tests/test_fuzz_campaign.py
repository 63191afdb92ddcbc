"""The fuzzing campaign (``crashsim fuzz``): it reaches every target, finds nothing on
today's code, and detects, saves and deduplicates a target that does crash."""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from crashsim import fuzz
from crashsim.cli import main
from crashsim.dmlog import DmLogError, read_log
from crashsim.image import SparseImage


def test_short_campaign_reaches_every_target_and_finds_no_crasher(tmp_path):
    lines: list[str] = []
    out = tmp_path / "crashers"
    result = fuzz.run_campaign(minutes=0.1, seed=11, corpus_dirs=[], out=out,
                               log=lines.append)
    names = {t.name for t in fuzz.default_targets()}
    assert set(result.per_target) == names
    assert all(result.per_target[n] >= 1 for n in names)
    assert result.inputs >= 20
    assert sum(result.per_family.values()) == result.inputs
    assert result.crashers == {}, fuzz.summary(result)
    assert not out.exists()  # nothing to save
    assert "sample" not in result.corpus or "(0 samples)" in result.corpus
    assert lines[-1].endswith("fuzz: no crashers")


def _boom(inp: fuzz.FuzzInput) -> None:
    if inp.rng.random() < 0.5:
        raise ZeroDivisionError("first kind")
    raise KeyError("second kind")


def test_crashing_target_is_detected_saved_and_deduplicated(tmp_path):
    out = tmp_path / "crashers"
    target = fuzz.Target("boom", "dmlog", _boom, (DmLogError,))
    result = fuzz.run_campaign(minutes=0.02, seed=3, corpus_dirs=[], out=out,
                               targets=[target], log=lambda line: None)
    assert result.inputs >= 4
    kinds = {key[0] for key in result.crashers}
    assert kinds == {"ZeroDivisionError", "KeyError"}
    assert sum(c.count for c in result.crashers.values()) == result.inputs
    for c in result.crashers.values():
        assert c.key[1].startswith("test_fuzz_campaign.py:")  # file:line of the raise
        assert c.saved is not None and c.saved.suffix == ".log"
        sidecar = c.saved.with_name(c.saved.name + ".txt").read_text()
        assert f"exception: {c.key[0]}" in sidecar and "Traceback" in sidecar
        assert f"seen: {c.count} inputs" in sidecar and "mutations:" in sidecar
    saved = sorted(p.name for p in out.iterdir())
    assert len(saved) == 4  # one input and one sidecar per unique crasher
    assert all(p.startswith("boom-") for p in saved)
    first = next(c for c in result.crashers.values() if c.key[0] == "KeyError")
    try:  # the saved input is the mutated log the target was given
        read_log(first.saved)
    except DmLogError:
        pass


def _spin(inp: fuzz.FuzzInput) -> None:
    while True:
        time.sleep(0.01)


def test_a_hang_is_a_crasher_keyed_by_function(tmp_path):
    target = fuzz.Target("spin", "scenario", _spin, (), timeout_s=0.2)
    result = fuzz.run_campaign(minutes=0.005, seed=1, corpus_dirs=[], out=None,
                               targets=[target], log=lambda line: None)
    assert list(result.crashers) == [("crashsim.fuzz.InputTimeout",
                                      "test_fuzz_campaign.py:_spin")]


def test_a_broken_error_contract_is_a_crasher(tmp_path):
    from crashsim.scenario import ScenarioError
    path = tmp_path / "s.yaml"
    with pytest.raises(fuzz.ContractError):
        fuzz.check_scenario_error(ScenarioError([]), path)
    with pytest.raises(fuzz.ContractError):
        fuzz.check_scenario_error(ScenarioError(["no location here"]), path)
    fuzz.check_scenario_error(ScenarioError([f"{path}:3: name: bad"]), path)


def test_cli_traceback_becomes_a_key():
    text = ('Traceback (most recent call last):\n'
            f'  File "{fuzz.PACKAGE_DIR}/vhdx_cli.py", line 12, in run\n'
            '    x()\n'
            f'  File "{fuzz.PACKAGE_DIR}/writers/vhdx/driver.py", line 99, in read\n'
            '    y()\n'
            'struct.error: unpack requires a buffer of 8 bytes\n'
            'crashsim: internal error (a bug in crashsim; please report it)\n')
    assert fuzz._key_from_text(text, 3) == ("struct.error",
                                            "crashsim/writers/vhdx/driver.py:99")


def test_mutations_are_deterministic_per_seed():
    seeds = {s.name: s for s in fuzz.crashsim_vhdx_seeds()}
    seed = seeds["dirty-3-entries"]
    a = fuzz.VhdxMutator(seed, random.Random(5))
    b = fuzz.VhdxMutator(seed, random.Random(5))
    assert a.mutate(4).content_key() == b.mutate(4).content_key()
    assert a.notes == b.notes and a.notes
    assert seed.image.content_key() != a.img.content_key()


def test_fuzz_command_exit_codes(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["fuzz", "--minutes", "0.02", "--seed", "5", "--no-samples",
                 "--out", str(out)]) == 0
    assert "fuzz: no crashers" in capsys.readouterr().out
    assert main(["fuzz", "--minutes", "0"]) == 2
    assert main(["fuzz", "--samples", str(tmp_path / "missing")]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["fuzz", "--out", str(tmp_path / "file"), "--no-samples"]) == 2
    err = capsys.readouterr().err
    assert err.count("crashsim: error:") == 3


def test_samples_are_decompressed_sparsely_and_loaded(tmp_path):
    samples = Path(__file__).resolve().parents[2] / "shared" / "vhdx-samples"
    if not samples.is_dir():
        pytest.skip("no ../shared/vhdx-samples beside the repository")
    seeds = fuzz.sample_vhdx_seeds([samples], tmp_path)
    assert len(seeds) == 3
    for seed in seeds:
        assert seed.geometry["virtual_size"] > 0 and seed.of("header")
        path = tmp_path / seed.name.removeprefix("sample:")
        assert path.stat().st_blocks * 512 < path.stat().st_size  # holes stay holes
    dirty = next(s for s in seeds if "dirtylog" in s.name)
    assert dirty.of("log-entry")


def test_an_image_too_large_for_a_file_is_saved_as_a_sector_dump(tmp_path, monkeypatch):
    monkeypatch.setattr(fuzz, "SAVE_MAX_FILE_BYTES", 1 << 20)
    img = SparseImage(64 << 30)  # 64 GiB virtual: never written out as a file
    img.write(5 << 30, b"\x42" * 700)
    inp = fuzz.FuzzInput("vhdx", 0, "x", random.Random(0), tmp_path, [], image=img)
    saved = inp.save(tmp_path / "big.vhdx")
    assert saved.name == "big.sectors" and saved.stat().st_size < 4096
    back = fuzz.load_sector_dump(saved)
    assert back.size_bytes == img.size_bytes and back.content_key() == img.content_key()
