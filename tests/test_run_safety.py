"""Run folders never lose or misrecord work (issue 24, first half).

- a run folder is recognized by its config.json content, never by the file name alone;
- ``--overwrite`` moves the old run aside until the new one has its first checkpoint, and a
  failed attempt puts it back (and leaves no stub);
- one writer per folder (lock file, stale locks of dead processes taken over): two trainers
  started into one folder, the second refuses naming the lock;
- stage outputs are staged and renamed into place: inference killed with SIGKILL leaves the old
  results folder byte-identical; stale files of an earlier run never survive;
- provenance: content hashes of data and weights in config.json / identification.json /
  inference.json; ``--resume`` refuses changed data, inference refuses an identification made
  with other weights (``--force`` overrides, recorded);
- the recorded command replays; file names from pair ids are sanitized; a failed checkpoint
  write is one clear error and leaves no temporary folder.

Data: a tiny 2D folder dataset (32 x 32 NIfTI, 5 pairs split 3/1/1, the test pair's id is
``../../esc`` to try to escape ``--out``); models: the ``--quick`` architecture, 2 steps.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets as D  # noqa: E402
from hypermorph_spatially_adaptive import artifacts as art  # noqa: E402
from hypermorph_spatially_adaptive import folders, jobs, provenance, trainer  # noqa: E402
from conftest import TINY_ARCH  # noqa: E402

nib = pytest.importorskip("nibabel")

PRESET = "elastic_global"
IDS = ["p0", "p1", "p2", "p3", "../../esc"]
SPLITS = ["train", "train", "train", "val", "test"]
ARCH = TINY_ARCH
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}


def _save(path, arr) -> None:
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))


def make_dataset(root, splits=SPLITS) -> str:
    """5 2D pairs (Gaussian blobs, labels 1..3 as boxes) and their pairs CSV; returns its path."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
    lines = ["pair_id,fixed,moving,fixed_seg,moving_seg,split"]
    for i, (pid, split) in enumerate(zip(IDS, splits)):
        for role in ("fixed", "moving"):
            c = 16 + rng.uniform(-2, 2, 2)
            img = np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / 80.0) + 0.1 * rng.random((32, 32))
            lab = np.zeros((32, 32), np.uint8)
            lab[8:16, 8:24], lab[16:24, 8:16], lab[16:24, 16:24] = 1, 2, 3
            _save(root / "img" / f"{role}{i}.nii.gz", img.astype(np.float32))
            _save(root / "img" / f"{role}{i}_seg.nii.gz", lab)
        lines.append(f"{pid},img/fixed{i}.nii.gz,img/moving{i}.nii.gz,img/fixed{i}_seg.nii.gz,"
                     f"img/moving{i}_seg.nii.gz,{split}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return str(root / "pairs.csv")


def train_argv(csv_path: str, out, steps: int = 2, extra=()) -> list:
    return ["--dataset", "folder", "--pairs-csv", csv_path, *ARCH, "--out", str(out), "--steps", str(steps),
            "--val-every", "1", "--log-every", "1", "--checkpoint-every", "1", *extra]


def snapshot(folder) -> dict:
    """Every file under ``folder`` -> its bytes."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), folder)] = fh.read()
    return out


def _infer_argv(b, out, extra=()) -> list:
    return ["--elastic-sa", str(b["sa"]), "--elastic-ident", str(b["ident"]), "--out", str(out), "--bootstrap", "100",
            "--panels", "1", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Dataset, a finished global and SA run (2 steps), a grid identification and one inference."""
    import inference
    import parameter_identification

    root = tmp_path_factory.mktemp("run_safety")
    csv_path = make_dataset(root / "data")
    runs = {p: root / "runs" / p for p in (PRESET, "elastic_sa")}
    for p, run in runs.items():
        trainer.main(p, train_argv(csv_path, run))
    ident = root / "ident"
    parameter_identification.main(["--run", str(runs[PRESET]), "--out", str(ident), "--grid-steps", "2",
                                   "--no-figure"])
    b = {"root": root, "csv": csv_path, "run": runs[PRESET], "sa": runs["elastic_sa"], "ident": ident}
    b["results"] = root / "results"
    inference.main(_infer_argv(b, b["results"], ["--save-nifti"]))
    return b


# ------------------------------------------------------------------------------------------
# run folder recognition and --overwrite
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, reason", [("{}", "preset None is none of"),
                                             ("[1, 2]", "a JSON list, not an object"),
                                             ("{not json", "not readable JSON")])
def test_overwrite_never_deletes_a_folder_that_is_no_run(tmp_path, base, content, reason):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "config.json").write_text(content)
    (folder / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match=reason) as err:
        trainer.main(PRESET, train_argv(base["csv"], folder, extra=["--overwrite"]))
    assert "refusing to write into it or delete it" in str(err.value)
    assert sorted(os.listdir(folder)) == ["config.json", "thesis.tex"]


def test_failed_overwrite_restores_the_old_run_and_a_failed_new_run_leaves_no_stub(tmp_path, base, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    before = snapshot(run)

    def fail(*a, **k):  # e.g. the replica check of --strategy mirrored, after the config is written
        raise ValueError("--batch-size 1 must be a multiple of the 2 replicas")

    monkeypatch.setattr(trainer, "_train", fail)
    with pytest.raises(ValueError, match="multiple of the 2 replicas"):
        trainer.main(PRESET, train_argv(base["csv"], run, extra=["--overwrite", "--seed", "3"]))
    assert snapshot(run) == before  # the old run is back, byte for byte
    assert [e for e in os.listdir(tmp_path) if e.startswith(".run.")] == []  # nothing aside, lock released
    new = tmp_path / "new"
    with pytest.raises(ValueError, match="multiple of the 2 replicas"):
        trainer.main(PRESET, train_argv(base["csv"], new))
    assert not new.exists()  # no stub config that would refuse the corrected command


def test_overwrite_deletes_the_old_run_only_after_the_first_checkpoint(tmp_path, base, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    (run / "identification").mkdir()
    seen = {}

    def train(preset, args, run_dir, config, *rest, on_checkpoint=None):  # the real one: 1 step, then this
        seen["before"] = sorted(e for e in os.listdir(tmp_path) if e != "run")
        os.makedirs(os.path.join(run_dir, art.CHECKPOINTS, "step_00000001"))
        on_checkpoint()
        seen["after"] = sorted(os.listdir(tmp_path))
        return run_dir

    monkeypatch.setattr(trainer, "_train", train)
    trainer.main(PRESET, train_argv(base["csv"], run, steps=1, extra=["--overwrite", "--seed", "5"]))
    assert len(seen["before"]) == 2 and {e.split(".")[2].split("-")[0] for e in seen["before"]} == {"lock", "old"}
    assert seen["after"] == [".run.lock", "run"]  # old run (and its identification/) deleted, new run locked
    config = art.read_config(str(run))
    assert config["seed"] == 5 and config["format"] == art.RUN_FORMAT and not (run / "identification").exists()
    assert sorted(os.listdir(tmp_path)) == ["run"]  # lock released


# ------------------------------------------------------------------------------------------
# locks
# ------------------------------------------------------------------------------------------
def test_two_trainers_one_folder_the_second_refuses_naming_the_lock(tmp_path, base):
    out = tmp_path / "run"
    script = os.path.join(ROOT, f"train_hypermorph_{PRESET}.py")
    first = subprocess.Popen([sys.executable, script, *train_argv(base["csv"], out, steps=1,
                                                                  extra=["--seed", "1", "--val-every", "0"])],
                             cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = folders.lock_path(str(out))
    t0 = time.time()
    while not os.path.exists(lock) and time.time() - t0 < 60 and first.poll() is None:
        time.sleep(0.05)
    assert os.path.exists(lock), first.communicate()[0]
    second = subprocess.run([sys.executable, script, *train_argv(base["csv"], out, extra=["--seed", "2"])],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"being written by process {first.pid}" in err[0]
    assert lock in err[0]
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log
    assert art.read_config(str(out))["seed"] == 1 and not os.path.exists(lock)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    folder = str(tmp_path / "out")
    with open(folders.lock_path(folder), "w") as fh:
        json.dump({"pid": pid, "host": socket.gethostname(), "started": "earlier"}, fh)
    lines = []
    with folders.FolderLock(folder, log=lines.append) as lock:
        assert json.load(open(lock.path))["pid"] == os.getpid()
    assert len(lines) == 1 and f"stale lock of process {pid}" in lines[0]
    assert not os.path.exists(folders.lock_path(folder))
    # a live holder (this process, as seen by another lock object) refuses
    with folders.FolderLock(folder):
        with pytest.raises(folders.FolderLockedError, match=f"being written by process {os.getpid()}"):
            folders.FolderLock(folder).acquire()


# ------------------------------------------------------------------------------------------
# staged outputs
# ------------------------------------------------------------------------------------------
def test_staged_folder_is_complete_or_old(tmp_path):
    out = tmp_path / "out"
    with folders.staged_folder(str(out), "identification folder", log=lambda _: None) as dest:
        open(os.path.join(dest, "grid_dice.csv"), "w").write("old method")
    marker = folders.read_marker(str(out))
    assert marker["stage"] == "identification folder" and marker["entries"] == ["grid_dice.csv"]
    with pytest.raises(RuntimeError):
        with folders.staged_folder(str(out), "identification folder", log=lambda _: None) as dest:
            open(os.path.join(dest, "identified_parameters.csv"), "w").write("half")
            raise RuntimeError("class-name check failed")
    assert sorted(os.listdir(out)) == ["grid_dice.csv", folders.STAGE_MARKER]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with folders.staged_folder(str(out), "identification folder", log=lambda _: None) as dest:
        open(os.path.join(dest, "objective_trace.csv"), "w").write("new")
    assert sorted(os.listdir(out)) == ["objective_trace.csv", folders.STAGE_MARKER]  # no stale file of the other method
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # a folder written before the marker existed is recognized by the stage's own record
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / art.IDENTIFICATION_META).write_text("{}")
    with folders.staged_folder(str(legacy), "identification folder", log=lambda _: None,
                               legacy_meta=art.IDENTIFICATION_META) as dest:
        open(os.path.join(dest, "a.csv"), "w").write("new")
    assert sorted(os.listdir(legacy)) == ["a.csv", folders.STAGE_MARKER]


def test_inference_killed_mid_run_leaves_the_old_results_intact(tmp_path, base):
    results = tmp_path / "results"
    shutil.copytree(base["results"], results)
    before = snapshot(results)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "inference.py"),
                             *_infer_argv(base, results, ["--refine", "200", "--save-nifti"])],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # first rows recorded: NIfTI files are being written (into the staging folder)
        seen.append(line)
        if "mean Dice" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any("mean Dice" in s for s in seen), "".join(seen)
    assert snapshot(results) == before  # old folder intact: no new table beside old metadata
    leftovers = [e for e in os.listdir(tmp_path) if e.startswith(".results.")]
    assert any(e.startswith(".results.tmp-") for e in leftovers)
    lines = []  # the next run takes the stale lock over and removes the temporary folder
    with folders.FolderLock(str(results), log=lines.append):
        folders.remove_stale_temps(str(results))
    assert len(lines) == 1 and f"stale lock of process {proc.pid}" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["results"]


def test_pair_ids_cannot_escape_the_output_folder(base):
    assert not os.path.exists(base["root"].parent / "esc")
    names = [os.path.relpath(os.path.join(d, f), base["results"]) for d, _, fs in os.walk(base["results"]) for f in fs]
    assert all(not n.startswith("..") for n in names)
    safe = folders.safe_file_name("../../esc")
    assert "/" not in safe and not safe.startswith(".") and ".." not in safe
    assert any(n.startswith(os.path.join("nifti", "oracle", safe, "")) for n in names), names
    meta = json.load(open(base["results"] / art.INFERENCE_META))
    assert meta["file_names"] == {"../../esc": safe}
    names = folders.safe_file_names(["a/b", "a_b", "..", ".x", "ok"])
    assert len(set(names.values())) == 5 and names["ok"] == "ok" and names[".x"] == "x"
    assert all("/" not in v and not v.startswith(".") for v in names.values())


# ------------------------------------------------------------------------------------------
# provenance and replay
# ------------------------------------------------------------------------------------------
def test_recorded_hashes_and_command_replay(base):
    config = art.read_config(str(base["run"]))
    rec = config["provenance"]
    assert rec["weights_sha256"] == art.file_sha256(str(base["run"] / art.WEIGHTS))
    ds = D.dataset_from_config(config["data"])
    assert rec["data"] == provenance.data_hashes(ds) and len(set(rec["data"].values())) == 3
    assert config["command"][0] == f"train_hypermorph_{PRESET}.py"  # not the caller's (pytest, run_pipeline)
    replay = trainer.build_parser(PRESET).parse_args(config["command"][1:])
    assert replay.out == str(base["run"]) and replay.steps == 2
    meta = json.load(open(base["ident"] / art.IDENTIFICATION_META))
    assert meta["provenance"]["global_weights_sha256"] == rec["weights_sha256"]
    assert meta["provenance"]["data"]["test"] == rec["data"]["test"] and meta["provenance"]["forced"] == []
    inf = json.load(open(base["results"] / art.INFERENCE_META))["provenance"]
    assert inf["data"]["test"] == rec["data"]["test"] and inf["forced"] == []


def test_resume_refuses_a_train_val_swap_in_the_same_csv(tmp_path, base):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    csv_path = base["csv"]
    original = open(csv_path).read()
    try:
        swapped = original.replace(",train\n", ",TMP\n", 1).replace(",val\n", ",train\n").replace(",TMP\n", ",val\n")
        open(csv_path, "w").write(swapped)
        with pytest.raises(ValueError, match="--resume refused: the train pairs differ") as err:
            trainer.main(PRESET, train_argv(csv_path, run, steps=3, extra=["--resume"]))
        assert "the val pairs differ" in str(err.value)
    finally:
        open(csv_path, "w").write(original)


def test_inference_refuses_an_identification_of_other_weights(tmp_path, base):
    import inference

    ident = tmp_path / "ident"
    shutil.copytree(base["ident"], ident)
    meta = json.load(open(ident / art.IDENTIFICATION_META))
    meta["provenance"]["global_weights_sha256"] = "0" * 64  # as if the global run was retrained since
    open(ident / art.IDENTIFICATION_META, "w").write(json.dumps(meta))
    other = tmp_path / "ident_gradient"  # a gradient identification of an SA run not given
    shutil.copytree(base["ident"], other)
    meta.update(method="gradient", sa_run=str(tmp_path / "another_sa"))
    meta["provenance"]["global_weights_sha256"] = provenance.weights_sha256(str(base["run"]))
    open(other / art.IDENTIFICATION_META, "w").write(json.dumps(meta))
    argv = ["--elastic-sa", str(base["sa"]), "--elastic-ident", str(ident), str(other), "--out", str(tmp_path / "res"),
            "--bootstrap", "100", "--panels", "0"]
    with pytest.raises(ValueError, match="was made with global weights sha256 000000000000, but .*weights.h5 is") as err:
        inference.main(argv)
    assert f"ident_gradient/identification.json is a gradient identification of the SA run {meta['sa_run']}, which " \
           "is none of the --elastic-sa runs given" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["ident", "ident_gradient"]  # refused before anything was written
    lines = []
    assert provenance.refuse_or_force(["a mismatch"], True, "inference", lines.append) == ["a mismatch"]
    assert lines == ["[inference] --force: proceeding despite: a mismatch"]


def test_identification_refuses_replaced_images_unless_forced(tmp_path, base):
    import parameter_identification

    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(base["csv"]), data)
    img = nib.load(str(data / "img" / "moving4.nii.gz"))
    _save(data / "img" / "moving4.nii.gz", np.asarray(img.dataobj)[::-1].copy())
    argv = ["--run", str(base["run"]), "--out", str(tmp_path / "id"), "--grid-steps", "2", "--no-figure",
            "--data-dir", str(data)]
    with pytest.raises(ValueError, match="the test pairs differ from those .*config.json recorded"):
        parameter_identification.main(argv)
    assert sorted(os.listdir(tmp_path)) == ["data"]
    parameter_identification.main(argv + ["--force"])  # proceeds, and says so in identification.json
    meta = json.load(open(tmp_path / "id" / art.IDENTIFICATION_META))
    assert meta["force"] is True and len(meta["provenance"]["forced"]) == 1
    assert "the test pairs differ" in meta["provenance"]["forced"][0]


def test_data_dir_overrides_the_saved_pairs_csv_of_a_moved_folder_dataset(tmp_path, base):
    new = tmp_path / "moved"
    shutil.copytree(os.path.dirname(base["csv"]), new)
    config = art.read_config(str(base["run"]))
    ds = D.dataset_from_config(config["data"], str(new))
    assert ds.pairs_csv == str(new / "pairs.csv")
    assert provenance.data_hashes(ds) == config["provenance"]["data"]  # same bytes, same hashes
    with pytest.raises(FileNotFoundError, match="no pairs.csv there"):
        D.dataset_from_config(config["data"], str(tmp_path))


# ------------------------------------------------------------------------------------------
# late errors of this half
# ------------------------------------------------------------------------------------------
def test_a_failed_checkpoint_write_is_one_error_and_leaves_no_temporary_folder(tmp_path):
    class FullDisk:
        def write(self, prefix):
            open(prefix + ".index", "wb").write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    with pytest.raises(OSError, match=r"cannot write the checkpoint of step 7 \(OSError: \[Errno 28\] No space"):
        trainer._write_checkpoint(FullDisk(), str(ckpt_dir), 7)
    assert os.listdir(ckpt_dir) == []


def test_pipeline_with_fewer_steps_says_so_in_its_own_terms(base):
    import argparse

    import run_pipeline

    with pytest.raises(ValueError, match=r"^--steps 1: .* is already trained to step 2, and the pipeline only "
                                         r"continues runs") as err:
        run_pipeline._refuse_shorter(argparse.Namespace(steps=1), str(base["run"]))
    assert "--resume" not in str(err.value)
    run_pipeline._refuse_shorter(argparse.Namespace(steps=2), str(base["run"]))


# ------------------------------------------------------------------------------------------
# issue 36: no stage deletes what it did not create, no command overwrites its own inputs,
# no stale or unfinished result is used silently
# ------------------------------------------------------------------------------------------
def _stage_case(tmp_path, base, case):
    """(stage main, argv, folder whose listing must not change, expected message) of one case."""
    import inference
    import parameter_identification as pid

    ident_argv = ["--run", str(base["run"]), "--grid-steps", "2", "--no-figure", "--out"]
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    ident = tmp_path / "ident"
    shutil.copytree(base["ident"], ident)
    if case == "thesis":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.tex").write_text("\\documentclass{book}")
        return pid.main, ident_argv + [str(tmp_path / "mine")], tmp_path / "mine", \
            "is not empty (thesis.tex) and holds no complete identification folder"
    if case == "the training run":
        return pid.main, ["--run", str(run), "--out", str(run)], run, f"--out {run} is an input of this command"
    if case == "the data folder":
        data = os.path.dirname(base["csv"])
        return pid.main, ident_argv + [data], data, "holds no complete identification folder"
    if case == "the working directory":
        return pid.main, ident_argv + ["."], os.getcwd(), "holds no complete identification folder"
    if case == "a folder holding the run":
        return pid.main, ["--run", str(run), "--out", str(tmp_path)], tmp_path, f"contains an input of this command ({run})"
    if case == "inference's own --elastic-ident":
        return inference.main, _infer_argv({**base, "ident": ident}, ident), ident, f"--out {ident} is an input"
    if case == "a regular file":
        (tmp_path / "notes").write_text("keep me")
        return pid.main, ident_argv + [str(tmp_path / "notes")], tmp_path, "is a file, not a folder"
    if case == "a symbolic link":
        (tmp_path / "link").symlink_to(ident)
        return pid.main, ident_argv + [str(tmp_path / "link")], tmp_path, "is a symbolic link"
    if case == "another stage's folder":
        res = tmp_path / "res"
        shutil.copytree(base["results"], res)
        return pid.main, ident_argv + [str(res)], res, "holds the output of another stage ('results folder',"
    if case == "a stage folder with a user's file":
        (ident / "my_notes.md").write_text("x")
        return pid.main, ident_argv + [str(ident)], ident, "holds my_notes.md besides the identification folder"
    raise AssertionError(case)


STAGE_CASES = ["thesis", "the training run", "the data folder", "the working directory", "a folder holding the run",
               "inference's own --elastic-ident", "a regular file", "a symbolic link", "another stage's folder",
               "a stage folder with a user's file"]


@pytest.mark.parametrize("case", STAGE_CASES)
def test_a_stage_replaces_only_its_own_complete_folder(tmp_path, base, case, monkeypatch):
    """Identification/inference --out: refused before anything is computed (no model loaded), and
    every file under the folder (and beside it) stays byte-identical."""
    from hypermorph_spatially_adaptive import run_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_folder, "load_run", lambda *a, **k: pytest.fail("a model was loaded before --out was checked"))
    main, argv, keep, msg = _stage_case(tmp_path, base, case)
    before, listing = snapshot(keep), sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="refusing to replace it|is an input|contains an input|is a file|symbolic") \
            as err:
        main(argv)
    assert msg in str(err.value), str(err.value)
    assert snapshot(keep) == before and sorted(os.listdir(tmp_path)) == listing  # no .tmp-, no lock left


def test_identification_rerun_replaces_its_own_folder(tmp_path, base):
    """The marker written by the stage lets the same stage replace the folder (and nothing else)."""
    import parameter_identification

    ident = tmp_path / "ident"
    shutil.copytree(base["ident"], ident)
    assert folders.read_marker(str(ident))["stage"] == "identification folder"
    assert set(folders.read_marker(str(ident))["entries"]) == set(os.listdir(ident)) - {folders.STAGE_MARKER}
    (ident / art.GRID_DICE).write_text("stale")
    parameter_identification.main(["--run", str(base["run"]), "--out", str(ident), "--grid-steps", "2",
                                   "--no-figure"])
    assert (ident / art.GRID_DICE).read_text() != "stale"
    assert sorted(os.listdir(tmp_path)) == ["ident"]


_LOCKED_OVERWRITE = r"""
import os, sys, time
sys.path.insert(0, {root!r})
from hypermorph_spatially_adaptive import folders
run = {run!r}
with folders.FolderLock(run, "run folder"):
    aside = folders.move_aside(run)
    try:
        os.makedirs(run)
        open(os.path.join(run, "config.json"), "w").write('{{"finished": false}}')
        print("moved aside", flush=True)
        time.sleep(60)
    except BaseException as exc:
        folders.restore(aside, run)
        print("restored after", type(exc).__name__, exc, flush=True)
        raise
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_sigterm_and_sighup_take_the_same_restore_path_as_ctrl_c(tmp_path, base, sig):
    """The trainer's --overwrite pattern in a child process (lock, move aside, write a stub, fail):
    each signal restores the old run byte for byte and releases the lock."""
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    before = snapshot(run)
    # SIGINT at its default, as under a terminal: a process started in the background (here a pytest-xdist
    # worker) passes SIGINT on ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-c", _LOCKED_OVERWRITE.format(root=ROOT, run=str(run))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "moved aside"
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=30)
    assert out.startswith("restored after"), (out, err)
    assert sig in out or sig == "SIGINT"
    assert proc.returncode != 0 and snapshot(run) == before
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no .run.old-*, no lock


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_during_a_real_overwrite_restores_the_finished_run(tmp_path, base, sig):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    before = snapshot(run)
    script = os.path.join(ROOT, f"train_hypermorph_{PRESET}.py")
    proc = subprocess.Popen([sys.executable, script, *train_argv(base["csv"], run, extra=["--overwrite", "--seed", "4"])],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "moved aside" in line:
            break
    proc.send_signal(getattr(signal, sig))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "the old run is back" in log, log
    assert snapshot(run) == before and sorted(os.listdir(tmp_path)) == ["run"]


def test_a_run_left_aside_by_a_killed_overwrite_is_put_back_by_the_next_command(tmp_path, base):
    """SIGKILL between move-aside and the first checkpoint leaves ``.run.old-*`` and a stub: the next
    training command on the folder puts the finished run back (and then refuses as for any
    finished run); a folder holding newer work keeps it and names the old run with the command."""
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    before = snapshot(run)
    aside = folders.move_aside(str(run))
    run.mkdir()
    (run / art.CONFIG).write_text(json.dumps({"preset": PRESET, "finished": False}))
    (run / art.TRAIN_LOG).write_text("step\n")
    with pytest.raises(ValueError, match=r"already holds a finished elastic_global run \(2 steps\)"):
        trainer.main(PRESET, train_argv(base["csv"], run))
    assert snapshot(run) == before and sorted(os.listdir(tmp_path)) == ["run"]
    # newer work in the folder (a checkpoint): the old run is kept aside and named, nothing restored
    aside = folders.move_aside(str(run))
    shutil.copytree(aside, run)
    lines = []
    with folders.FolderLock(str(run), "run folder", log=lines.append, replaceable=art.attempt_without_checkpoint):
        pass
    assert os.path.isdir(aside) and len(lines) == 1
    assert f"{aside}: a run moved aside by a killed --overwrite" in lines[0] and f"mv '{aside}' '{run}'" in lines[0]


_PARENT = r"""
import sys
sys.path.insert(0, {root!r})
from hypermorph_spatially_adaptive import jobs
jobs.run_child([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"])
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_child_process_dies_with_its_parent(sig):
    """benchmarks/study.py runs run_pipeline.py through jobs.run_child: SIGTERM to the parent
    stops the child first; SIGKILL (no clean-up possible) reaches it through PR_SET_PDEATHSIG."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT.format(root=ROOT)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(getattr(signal, sig))
    parent.wait(timeout=30)
    t0 = time.time()
    while _alive(child) and time.time() - t0 < 10:
        time.sleep(0.05)
    assert not _alive(child)
    import benchmarks.study as study  # the study's children go through it

    src = open(study.__file__).read()
    assert "subprocess.call(" not in src.split("def _git_head")[0] and src.count("run_child(") >= 2


def test_last_error_line_gives_the_reason_of_a_failed_child(tmp_path):
    log = tmp_path / "pipeline.log"
    log.write_text("=== run\n[data] ok\nTraceback ...\nerror: argument --seed: must be >= 0, got -1\n\n")
    assert jobs.last_error_line(str(log)) == "error: argument --seed: must be >= 0, got -1"
    log.write_text("usage: run_pipeline.py\nrun_pipeline.py: error: argument --seed: must be >= 0, got -1\n")
    assert jobs.last_error_line(str(log)).endswith("argument --seed: must be >= 0, got -1")
    assert jobs.last_error_line(str(tmp_path / "missing")) == ""


def _mid_resume(tmp_path, base, name="run"):
    """A finished 2-step run whose --resume to 4 steps was interrupted: config finished false, a
    step-3 checkpoint named latest, weights.h5 still from step 2."""
    run = tmp_path / name
    shutil.copytree(base["run"], run)
    cfg = json.loads((run / art.CONFIG).read_text())
    cfg["finished"] = False
    cfg["training"]["steps"] = 4
    cfg["resumed"] = [{"command": cfg["command"] + ["--steps", "4", "--resume"], "from_step": 2, "steps": 4}]
    (run / art.CONFIG).write_text(json.dumps(cfg))
    shutil.copytree(run / art.CHECKPOINTS / "step_00000002", run / art.CHECKPOINTS / "step_00000003")
    (run / art.CHECKPOINTS / "latest").write_text("step_00000003\n")
    return run


def test_downstream_stages_refuse_an_unfinished_or_mid_resume_run(tmp_path, base):
    import inference
    import parameter_identification

    run = _mid_resume(tmp_path, base)
    finish = r"finish it first: python train_hypermorph_elastic_global.py .*--steps 4 --resume"
    with pytest.raises(ValueError, match=r"training is unfinished \(.*finished: false, target 4 steps; its latest "
                                         r"checkpoint is step_00000003, and weights.h5 is from an earlier session\); "
                       + finish):
        parameter_identification.main(["--run", str(run), "--out", str(tmp_path / "id"), "--grid-steps", "2"])
    sa = _mid_resume(tmp_path, {**base, "run": base["sa"]}, "sa")
    with pytest.raises(ValueError, match="training is unfinished"):
        inference.main(_infer_argv({**base, "sa": sa}, tmp_path / "res"))
    assert sorted(os.listdir(tmp_path)) == ["run", "sa"]  # nothing written
    info = art.read_run(str(run), require_finished=False)  # reading the state is still possible
    assert not info.finished
    # a finished run whose weights.h5 is not the file training recorded
    other = tmp_path / "other"
    shutil.copytree(base["run"], other)
    (other / art.WEIGHTS).write_bytes((base["sa"] / art.WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match=r"weights.h5 \(sha256 \w+\) is not the file training finished with"):
        art.read_run(str(other))
    # a hand-edited num_classes is named as such (not blamed on weights.h5)
    edited = tmp_path / "edited"
    shutil.copytree(base["run"], edited)
    cfg = json.loads((edited / art.CONFIG).read_text())
    cfg["model"]["num_classes"] = 5
    (edited / art.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model num_classes 5 but class_names lists 3 .*the config was edited") as err:
        art.read_run(str(edited))
    assert "weights.h5" not in str(err.value).split("(the weights")[0]


def test_a_truncated_checkpoint_names_the_intact_one_and_a_failed_resume_keeps_the_run_finished(tmp_path, base):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    cfg_before = art.read_config(str(run))
    data = run / art.CHECKPOINTS / "step_00000002" / "ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ValueError) as err:
        trainer.main(PRESET, train_argv(base["csv"], run, steps=3, extra=["--resume"]))
    msg = str(err.value)
    assert f"{run}/checkpoints/step_00000002/ckpt: checkpoint step_00000002 cannot be read" in msg, msg
    assert str(data) in msg and f"the earlier checkpoint {run}/checkpoints/step_00000001 is intact" in msg, msg
    after = art.read_config(str(run))
    assert after["finished"] is True and after["final_step"] == 2 and after.get("resumed") == cfg_before.get("resumed")
    assert art.read_run(str(run)).finished  # still usable downstream
