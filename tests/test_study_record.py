"""The study's durable record (benchmarks/study_record.py): what it keeps, and that a saved unit
comes back byte for byte."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import study_record  # noqa: E402

UNIT = os.path.join("paper", "seed0")


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _fake_unit(study):
    u = os.path.join(study, UNIT)
    files = {
        "DONE.json": b'{"setting": "paper", "seed": 0}\n',
        "results/per_pair_metrics.csv": b"pair_id,method,mean_dice\n007,elas-g,0.81\n008,elas-g,0.79\n" * 50,
        "results/table1.md": b"| a | b |\n",
        "identification/elastic/grid_dice.csv": b"pair_id,g_lambda,g_mu,mean_dice\n007,0.0,0.1,0.5\n",
        "runs/elastic_sa/config.json": b'{"preset": "elastic_sa"}',
        "smooth0.8/runs/elastic_sa/config.json": b'{"preset": "elastic_sa", "smooth": 0.8}',
        "smooth0.8/results/per_pair_metrics.csv": b"pair_id,method\n007,elas-sas\n",
    }
    dropped = {
        "runs/elastic_sa/weights.h5": b"\0" * 100,
        "runs/elastic_sa/history.csv": b"step,loss\n1,0.5\n",
        "runs/elastic_sa/checkpoint/state.json": b"{}",
        "smooth0.8/runs/elastic_sa/history.csv": b"step,loss\n",
        "results/pair_007/moved.nii.gz": b"\x1f\x8b",
        "results/fig3.png": b"\x89PNG",
        "pipeline.log": b"log",
        "identification_gradient/elastic/objective_trace.csv": b"step,objective\n0,0.2\n",
    }
    for rel, data in {**files, **dropped}.items():
        _write(os.path.join(u, rel), data)
    return files, dropped


def test_save_then_restore_gives_the_kept_files_back_byte_for_byte(tmp_path):
    study, record, again = str(tmp_path / "study"), str(tmp_path / "record"), str(tmp_path / "again")
    files, dropped = _fake_unit(study)
    assert study_record.units(study) == [UNIT]
    assert study_record.save_unit(study, record, UNIT) == len(files)
    # CSV files are stored gzipped, the rest as they are
    assert os.path.isfile(os.path.join(record, UNIT, "results", "per_pair_metrics.csv.gz"))
    assert not os.path.exists(os.path.join(record, UNIT, "results", "per_pair_metrics.csv"))
    assert study_record.restore_unit(again, record, UNIT) == len(files)
    for rel, data in files.items():
        with open(os.path.join(again, UNIT, rel), "rb") as f:
            assert f.read() == data, rel
    for rel in dropped:
        assert not os.path.exists(os.path.join(again, UNIT, rel)), rel
        assert not os.path.exists(os.path.join(record, UNIT, rel)), rel
    assert study_record.units(again) == [UNIT]


def test_saving_twice_gives_identical_bytes(tmp_path):
    """No time stamp in the gzip headers: re-saving an unchanged unit changes nothing in git."""
    study = str(tmp_path / "study")
    _fake_unit(study)
    blobs = []
    for name in ("r1", "r2"):
        study_record.save_unit(study, str(tmp_path / name), UNIT)
        path = tmp_path / name / UNIT / "results" / "per_pair_metrics.csv.gz"
        blobs.append(path.read_bytes())
    assert blobs[0] == blobs[1]


def test_restore_keeps_existing_files_and_an_unfinished_unit_is_refused(tmp_path):
    study, record = str(tmp_path / "study"), str(tmp_path / "record")
    _fake_unit(study)
    study_record.save_unit(study, record, UNIT)
    target = tmp_path / "other" / UNIT / "results" / "table1.md"
    _write(str(target), b"newer\n")
    study_record.restore_unit(str(tmp_path / "other"), record, UNIT)
    assert target.read_bytes() == b"newer\n"
    os.remove(os.path.join(study, UNIT, "DONE.json"))
    with pytest.raises(FileNotFoundError, match="not finished"):
        study_record.save_unit(study, record, UNIT)
    # the earlier record of the unit is still whole
    assert os.path.isfile(os.path.join(record, UNIT, "DONE.json"))


def test_cli_saves_every_finished_unit(tmp_path):
    study, record = str(tmp_path / "study"), str(tmp_path / "record")
    _fake_unit(study)
    os.makedirs(os.path.join(study, "calibrated", "seed1"))  # unfinished: not a unit
    assert study_record.main(["save", "--study", study, "--record", record]) == [UNIT]
    assert study_record.units(record) == [UNIT]


def _snapshot(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as fh:
                out[os.path.relpath(os.path.join(root, n), folder)] = fh.read()
    return out


def test_save_over_an_existing_unit_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """Issue 36: a failure while the new unit is put in place leaves the old recorded unit whole
    (before: the old one was deleted first, and the failure left neither)."""
    study, record = str(tmp_path / "study"), str(tmp_path / "record")
    _fake_unit(study)
    study_record.main(["save", "--study", study, "--record", record])
    old = _snapshot(os.path.join(record, UNIT))
    _write(os.path.join(study, UNIT, "results", "table1.md"), b"| new |\n")
    real_replace = os.replace

    def failing(src, dst):
        if os.path.basename(src).startswith(".seed0.tmp-"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(study_record.os, "replace", failing)
    with pytest.raises(study_record.RecordError, match=r"record/paper/seed0: cannot replace the recorded unit "
                                                       r"\(OSError: No space left on device\)"):
        study_record.main(["save", "--study", study, "--record", record])
    monkeypatch.setattr(study_record.os, "replace", real_replace)
    assert _snapshot(os.path.join(record, UNIT)) == old
    assert sorted(os.listdir(os.path.join(record, "paper"))) == ["seed0"]  # no hidden leftovers
    study_record.main(["save", "--study", study, "--record", record])  # the save itself replaces it
    assert _snapshot(os.path.join(record, UNIT))["results/table1.md"] == b"| new |\n"
    assert sorted(os.listdir(os.path.join(record, "paper"))) == ["seed0"]


def test_corrupt_or_unwritable_record_errors_name_the_file(tmp_path):
    study, record = str(tmp_path / "study"), str(tmp_path / "record")
    _fake_unit(study)
    study_record.main(["save", "--study", study, "--record", record])
    bad = os.path.join(record, UNIT, "results", "per_pair_metrics.csv.gz")
    _write(bad, b"not a gzip file")
    again = str(tmp_path / "again")
    with pytest.raises(study_record.RecordError, match=f"{bad}: cannot read the recorded file \\(BadGzipFile: "):
        study_record.main(["restore", "--study", again, "--record", record])
    _write(bad, open(bad, "rb").read()[:5])  # truncated
    with pytest.raises(study_record.RecordError, match=f"{bad}: cannot read the recorded file"):
        study_record.main(["restore", "--study", str(tmp_path / "again2"), "--record", record])
    blocked = str(tmp_path / "blocked")
    _write(blocked, b"a file where the record folder should be")
    with pytest.raises(study_record.RecordError, match=f"{blocked}/paper: cannot create the record folder"):
        study_record.main(["save", "--study", study, "--record", blocked])
