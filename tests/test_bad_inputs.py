"""Bad inputs are caught early and clearly; run folders never lie and never vanish (issues #12, #24).

Every case is one row of :data:`CASES`: ``(case, kind, argv/setup, expected message substring)``.
``kind`` picks the runner (``_run_<kind>``), which asserts the exact behaviour: the message, and
where it matters that nothing was written, the old run survived, or it failed before training.
The "Bad inputs" table of docs/troubleshooting.md lists the same cases.

Data: tiny 2D folder datasets (32 x 32 NIfTI written here with nibabel, 5 pairs split 3/1/1);
models: the ``--quick`` architecture with 1-2 steps. One run is trained per module (and one more
for ``--overwrite``); every other refusal happens before a model is built.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets as D  # noqa: E402
from hypermorph_spatially_adaptive import cli, run_folder, trainer  # noqa: E402
from conftest import TINY_ARCH  # noqa: E402

nib = pytest.importorskip("nibabel")

PRESET = "elastic_global"
SPLITS5 = ["train", "train", "train", "val", "test"]
ARCH = TINY_ARCH


# ------------------------------------------------------------------------------------------
# tiny folder datasets
# ------------------------------------------------------------------------------------------
def _save(path, arr) -> None:
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))


def make_dataset(root, n=5, size=(32, 32), split=SPLITS5, seed=0) -> str:
    """``n`` 2D pairs (smooth images, labels 1..3 as boxes) and their pairs CSV; returns its path."""
    rng = np.random.default_rng(seed)
    img_dir = root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in size], indexing="ij")
    lines = ["pair_id,fixed,moving,fixed_seg,moving_seg" + (",split" if split else "")]
    for i in range(n):
        row = [f"p{i}"]
        for role in ("fixed", "moving"):
            c = np.array(size) / 2 + rng.uniform(-2, 2, 2)
            img = np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / (2 * (size[0] / 5) ** 2)) + 0.1 * rng.random(size)
            lab = np.zeros(size, np.uint8)
            h, w = size[0] // 4, size[1] // 4
            lab[h:2 * h, w:3 * w], lab[2 * h:3 * h, w:2 * w], lab[2 * h:3 * h, 2 * w:3 * w] = 1, 2, 3
            _save(img_dir / f"{role}{i}.nii.gz", img.astype(np.float32))
            _save(img_dir / f"{role}{i}_seg.nii.gz", lab)
        row += [f"img/fixed{i}.nii.gz", f"img/moving{i}.nii.gz", f"img/fixed{i}_seg.nii.gz", f"img/moving{i}_seg.nii.gz"]
        lines.append(",".join(row + ([split[i]] if split else [])))
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return str(root / "pairs.csv")


def data_argv(csv_path: str) -> list:
    return ["--dataset", "folder", "--pairs-csv", csv_path]


def train_argv(csv_path: str, out, steps: int = 2, extra=()) -> list:
    return data_argv(csv_path) + ARCH + ["--out", str(out), "--steps", str(steps), "--val-every", "1",
                                                  "--log-every", "1", "--checkpoint-every", "1", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A dataset and one finished 2-step run of PRESET trained on it (never modified by tests)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    csv_path = make_dataset(root / "data")
    run = root / "run"
    trainer.main(PRESET, train_argv(csv_path, run))
    return {"root": root, "csv": csv_path, "run": run}


def copy_run(base, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base["run"], dst)
    return dst


def snapshot(folder) -> dict:
    """Every file under ``folder`` -> its bytes (to prove a refused command changed nothing)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


# ------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------
CASES = [
    # --- 3/6: arguments refused at parse time (nothing written, no TensorFlow model) --------
    ("steps 0", "parse", "train --steps 0", "argument --steps: must be >= 1, got 0"),
    ("steps -5", "parse", "train --steps -5", "argument --steps: must be >= 1, got -5"),
    ("epochs 0", "parse", "train --epochs 0", "argument --epochs: must be a finite number > 0, got 0"),
    ("lr -1", "parse", "train --lr -1", "argument --lr: must be a finite number > 0, got -1"),
    ("ncc-win 0", "parse", "train --ncc-win 0", "argument --ncc-win: must be >= 1, got 0"),
    ("ncc-win even", "parse", "train --ncc-win 8", "argument --ncc-win: must be odd (a window centred on its voxel), got 8"),
    ("checkpoint-every 0", "parse", "train --checkpoint-every 0", "argument --checkpoint-every: must be >= 1, got 0"),
    ("log-every 0", "parse", "train --log-every 0", "argument --log-every: must be >= 1, got 0"),
    ("batch-size 0", "parse", "train --batch-size 0", "argument --batch-size: must be >= 1, got 0"),
    ("identification batch-size -1", "parse", "identify --run x --batch-size -1",
     "argument --batch-size: must be >= 0, got -1"),
    ("identification grid-steps 1", "parse", "identify --run x --grid-steps 1",
     "argument --grid-steps: must be >= 2, got 1"),
    ("inference panels -1", "parse", "infer --panels -1", "argument --panels: must be >= 0, got -1"),
    # --- issue 24: parse-time refusals that came late, as tracebacks or unclear ---------------
    ("pipeline panels -1", "parse", "pipeline --panels -1", "argument --panels: must be >= 0, got -1"),
    ("pipeline grid-steps 0", "parse", "pipeline --grid-steps 0", "argument --grid-steps: must be >= 2, got 0"),
    ("pipeline seed -1", "parse", "pipeline --seed -1", "argument --seed: must be >= 0, got -1"),
    ("pipeline train-args unbalanced quote", "parse", "pipeline --train-args \"--ncc-win '7\"",
     "argument --train-args: cannot split \"--ncc-win '7\" into options (No closing quotation); balance the quotes"),
    ("inference bootstrap 0", "parse", "infer --bootstrap 0", "argument --bootstrap: must be >= 100, got 0"),
    ("inference seed -1", "parse", "infer --seed -1", "argument --seed: must be >= 0, got -1"),
    ("inference refine-lr nan", "parse", "infer --refine-lr nan",
     "argument --refine-lr: must be a finite number > 0, got nan"),
    ("identification grid value 1.5", "parse", "identify --run x --grid 0 1.5",
     "argument --grid: must be a finite number >= 0 and <= 1, got 1.5"),
    ("gradient steps 0", "parse", "identify --run x --method gradient --steps 0",
     "argument --steps: must be >= 1, got 0"),
    ("gradient lr 0", "parse", "identify --run x --method gradient --lr 0",
     "argument --lr: must be a finite number > 0, got 0"),
    ("image-size 0", "parse", "train --image-size 0", "argument --image-size: must be >= 1, got 0"),
    ("num-classes 0", "parse", "train --dataset folder --num-classes 0", "argument --num-classes: must be >= 1, got 0"),
    ("class names repeated", "parse", "train --dataset folder --class-names lung,lung,liver",
     "argument --class-names: class names must differ, lung is repeated in 'lung,lung,liver'"),
    ("grid too large for memory", "grid", "--grid-steps 1000 --batch-size 1000000",
     "--batch-size 1000000: 1000000 elastic grid points per chunk at 32 x 32 voxels hold ~12.3 GB of displacements "
     "and warped images, above --max-grid-gb 4; use --batch-size 325520 or less"),
    # --- 2: run folders are never destroyed silently -------------------------------------------
    ("train into a finished run", "folder", "",
     "already holds a finished elastic_global run (2 steps); use --resume to continue it, --overwrite"),
    ("train into an unfinished run", "folder", "unfinished",
     "already holds an unfinished elastic_global run (target 2 steps); use --resume to continue it"),
    ("train into a folder that is no run", "folder", "foreign",
     "is not empty (notes.txt) and holds no run (no config.json); refusing to write into it or delete it"),
    ("--overwrite a folder that is no run", "folder", "foreign --overwrite", "holds no run (no config.json)"),
    ("--resume with --overwrite", "folder", "--resume --overwrite", "--resume and --overwrite exclude each other"),
    # --- 1: --resume refuses changed options, naming each ----------------------------------
    ("resume, other --lr", "resume", "--lr 1e-3", "--resume refused: changed --lr 0.0001 -> 0.001"),
    ("resume, other --ncc-win", "resume", "--ncc-win 7", "--resume refused: changed --ncc-win 9 -> 7"),
    ("resume, other dataset", "resume", "other-csv", "--resume refused: changed --pairs-csv"),
    ("resume, other architecture", "resume", "--hyp-units 16", "--resume refused: changed --hyp-units 32 -> 16"),
    ("resume, other seed and batch", "resume", "--seed 3 --batch-size 2", "--resume refused: changed --batch-size 1 -> 2; --seed 0 -> 3"),
    ("resume, fewer steps", "resume", "--steps 1", "the run's checkpoint is at step 2; the step target can only grow"),
    ("resume, same options, finished", "resume-ok", "", "is already finished at step 2; nothing to do"),
    # --- 4/5: the dataset is validated before training --------------------------------------
    ("fixed label outside --num-classes", "data", "fixed-label-7 --num-classes 3",
     "fixed label map {d}/img/fixed1_seg.nii.gz has labels outside 0..3: [0, 1, 2, 3, 7]"),
    ("moving label outside --num-classes", "data", "moving-label-7 --num-classes 3",
     "moving label map {d}/img/moving1_seg.nii.gz has labels outside 0..3: [0, 1, 2, 3, 7]"),
    ("undeclared stray label (warning)", "warn", "fixed-label-5",
     "classes class4 have no voxels in any label map (labels found: [0, 1, 2, 3, 5])"),
    ("3D file in a 2D dataset", "data", "moving-3d",
     "moving image {d}/img/moving2.nii.gz is a 3D volume (32, 32, 5) but the dataset is 2D"),
    ("size not divisible by 16", "data", "size-24",
     "image size 24 x 24 is not divisible by 16 along axis 0, 1 (the U-Net halves the image 4 times); "
     "crop or pad the images, e.g. to 32 x 32"),
    ("corrupt test file", "data", "corrupt-test", "cannot read NIfTI fixed image {d}/img/fixed4.nii.gz"),
    ("ncc-win beyond the image", "data", "plain --ncc-win 33",
     "--ncc-win 33 is longer than the smallest image side (32 voxels of 32 x 32); use an odd window <= 31"),
    ("label only in a moving map", "data", "moving-only-label-4",
     "moving label map {d}/img/moving1_seg.nii.gz has label(s) [4] that no fixed label map of {d}/pairs.csv has "
     "(fixed labels 0..3; 1 moving map(s) affected); fix the label map, or declare the classes"),
    ("negative label", "data", "fixed-label-neg",
     "fixed label map {d}/img/fixed1_seg.nii.gz has negative labels [-1]; labels are 0 (background) and 1..C"),
    ("pairs CSV in latin-1", "data", "latin1-csv", "pairs CSV {d}/pairs.csv is not UTF-8 text (byte 0xe9 at offset"),
    ("pairs CSV binary", "data", "binary-csv", "pairs CSV {d}/pairs.csv is not UTF-8 text (byte 0x89 at offset 0)"),
    ("moving voxel size and affine differ (warning)", "warn-load", "moving-geometry",
     "pair p1: moving image {d}/img/moving1.nii.gz differs from its fixed image {d}/img/fixed1.nii.gz in voxel "
     "size (2.5, 2.5 mm vs 1, 1 mm) and axis directions (affine); nothing is resampled"),
    ("one voxel at 1e6 (warning)", "warn-load", "outlier",
     "image {d}/img/moving1.nii.gz: its maximum 1e+06 lies far above its 99th percentile"),
    ("pairs CSV with BOM and CRLF", "csv-ok", "bom-crlf", "p0 p1 p2 p3 p4"),
    ("pair ids NA, None, nan", "csv-ok", "na-ids", "NA None nan p3 p4"),
    ("identification.json truncated", "ident", "truncate-json",
     "{f}/identification.json: unreadable identification record, truncated or corrupt"),
    ("identification.json without regularizer", "ident", "no-regularizer",
     "{f}/identification.json: identification record lacks the key(s) 'regularizer': "
     "rerun parameter_identification.py"),
    ("identified_parameters.csv header only", "ident", "header-only",
     "{f}/identified_parameters.csv: no rows, only a header: rerun parameter_identification.py"),
    ("identified_parameters.csv in latin-1", "ident", "latin1-csv", "{f}/identified_parameters.csv: not UTF-8 text"),
    ("corrupt test file (pipeline)", "pipeline", "corrupt-test", "cannot read NIfTI fixed image {d}/img/fixed4.nii.gz"),
    ("empty test split (pipeline)", "pipeline", "no-test", "the test split is empty"),
    ("ncc-win beyond the image (pipeline)", "pipeline", "plain --train-args '--ncc-win 33'",
     "--ncc-win 33 is longer than the smallest image side (32 voxels of 32 x 32)"),
    # --- issue 36: register.py, every output checked and every input's geometry before any model --
    ("register --out-warped = --moving", "register", "--out-warped {moving}",
     "--out-warped {moving} is the input --moving {moving}; writing it would overwrite the input"),
    ("register --out-disp = --fixed", "register", "--out-disp {fixed}", "--out-disp {fixed} is the input --fixed"),
    ("register --out-warped-seg = --moving-seg", "register", "--moving-seg {moving_seg} --out-warped-seg {moving_seg}",
     "--out-warped-seg {moving_seg} is the input --moving-seg"),
    ("register --out-warped X --out-disp X", "register", "--out-warped {t}/x.nii.gz --out-disp {t}/./x.nii.gz",
     "--out-disp and --out-warped are the same file {t}/./x.nii.gz; each output needs its own path"),
    ("register output .png", "register", "--out-warped {t}/w.png",
     "--out-warped {t}/w.png: expected a file ending in .nii or .nii.gz"),
    ("register output in a read-only folder", "register", "--out-warped {t}/ro/w.nii.gz",
     "--out-warped {t}/ro/w.nii.gz: the folder {t}/ro is not writable"),
    ("register --params name repeated", "register", "--params lambda=0.1 lambda=0.9 mu=0.5",
     "parameter lambda given twice (lambda=0.1 and lambda=0.9); give each name once"),
    ("register label 2^32 + 2 (int64)", "register", "--moving-seg {wrap}",
     "has label 4294967298 (int64), far outside any class range"),
    ("register segmentation header shifted 10 mm", "register", "--fixed-seg {shifted_seg}",
     "does not lie on its image's grid: affine [1 0 0 10; 0 1 0 0; 0 0 1 0] vs [1 0 0 0; 0 1 0 0; 0 0 1 0]"),
    ("register moving image without overlap", "register", "--moving {far}",
     "do not overlap in world space (their centres are 500.0 mm apart)"),
    ("register 20000^2 image", "register", "--fixed {big}",
     "has 400,000,000 voxels (20000 x 20000), above the limit of 268,435,456 (pair_registration.MAX_VOXELS)"),
    ("register singular affine", "register", "--fixed {singular}",
     "its affine is singular (a zero voxel size or parallel axes)"),
    ("register complex image", "register", "--moving {complex}",
     "has complex values (complex64); give a real image, e.g. its magnitude"),
    ("register --fixed DIR", "register", "--fixed {t}", "fixed image {t} is a folder; give a NIfTI file"),
    ("register with a mid-resume run", "register", "--run {unfinished}",
     "training is unfinished ({unfinished}/config.json records finished: false, target 2 steps; its latest checkpoint "
     "is step_00000002, and weights.h5 is from an earlier session); finish it first: python "
     "train_hypermorph_elastic_global.py"),
    ("register with a hand-edited num_classes", "register", "--run {edited}",
     "{edited}/config.json: model num_classes 5 but class_names lists 3"),
    # --- 6: weights that cannot be loaded ----------------------------------------------------
    ("truncated weights.h5", "weights", "truncate",
     "is not the file training finished with"),
    ("weights of another architecture", "weights", "other-arch",
     "is not the file training finished with"),
]
IDS = [c[0] for c in CASES]


def _setup_data(tmp_path, setup: str):
    """Dataset variants named in the table; returns (csv path, extra argv)."""
    words = shlex.split(setup)
    what, extra = words[0], words[1:]
    d = tmp_path / "data"
    if what == "size-24":
        return make_dataset(d, size=(24, 24)), extra
    if what == "no-test":
        return make_dataset(d, split=["train", "train", "train", "val", "val"]), extra
    csv_path = make_dataset(d)
    if what in ("fixed-label-7", "moving-label-7", "fixed-label-5", "moving-only-label-4", "fixed-label-neg"):
        role, value = what.split("-")[0], (-1 if what.endswith("neg") else int(what[-1]))
        path = d / "img" / f"{role}1_seg.nii.gz"
        lab = np.asarray(nib.load(str(path)).dataobj).astype(np.int16)
        lab[0, 0] = value
        _save(path, lab)
    elif what == "moving-geometry":  # 2.5 mm voxels, rotated by 30 degrees about the third axis
        path = d / "img" / "moving1.nii.gz"
        c, s_ = np.cos(np.pi / 6), np.sin(np.pi / 6)
        aff = np.diag([2.5, 2.5, 1.0, 1.0])
        aff[:2, :2] = 2.5 * np.array([[c, -s_], [s_, c]])
        nib.save(nib.Nifti1Image(np.asarray(nib.load(str(path)).dataobj), aff), str(path))
    elif what == "outlier":
        path = d / "img" / "moving1.nii.gz"
        img = np.asarray(nib.load(str(path)).dataobj).copy()
        img[5, 5] = 1e6
        _save(path, img)
    elif what in ("latin1-csv", "binary-csv"):
        text = open(csv_path).read().replace("p1,", "p\u00e91,")
        data = text.encode("latin-1") if what == "latin1-csv" else b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256))
        open(csv_path, "wb").write(data)
    elif what == "bom-crlf":
        text = open(csv_path).read()
        open(csv_path, "wb").write(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    elif what == "na-ids":
        text = open(csv_path).read()
        for old, new in (("p0,", "NA,"), ("p1,", "None,"), ("p2,", "nan,")):
            text = text.replace(old, new)
        open(csv_path, "w").write(text)
    elif what == "moving-3d":
        _save(d / "img" / "moving2.nii.gz", np.random.default_rng(0).random((32, 32, 5)).astype(np.float32))
    elif what == "corrupt-test":
        path = d / "img" / "fixed4.nii.gz"
        path.write_bytes(path.read_bytes()[:100])
    return csv_path, extra


# ------------------------------------------------------------------------------------------
# runners
# ------------------------------------------------------------------------------------------
def _parser(script: str):
    import inference
    import parameter_identification

    import run_pipeline

    return {"train": lambda: trainer.build_parser(PRESET), "identify": parameter_identification.build_parser,
            "infer": inference.build_parser, "pipeline": run_pipeline.build_parser}[script]()


def _run_parse(case, setup, expected, tmp_path, capsys, request):
    script, *argv = shlex.split(setup)
    parser = _parser(script)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.startswith(parser.format_usage())  # the script's own usage block, not another stage's


def _run_folder(case, setup, expected, tmp_path, capsys, request):
    b = request.getfixturevalue("base")
    run = copy_run(b, tmp_path)
    extra = setup.split()
    if extra[:1] == ["unfinished"]:
        cfg = json.loads((run / "config.json").read_text())
        cfg["finished"] = False
        (run / "config.json").write_text(json.dumps(cfg))
        extra = extra[1:]
    if extra[:1] == ["foreign"]:
        shutil.rmtree(run)
        run.mkdir()
        (run / "notes.txt").write_text("my notes")
        extra = extra[1:]
    before = snapshot(run)
    with pytest.raises(ValueError) as exc:
        trainer.main(PRESET, train_argv(b["csv"], run, extra=extra))
    assert expected in str(exc.value)
    assert snapshot(run) == before  # the old run (or the foreign folder) survives untouched


def _run_resume(case, setup, expected, tmp_path, capsys, request):
    b = request.getfixturevalue("base")
    run = copy_run(b, tmp_path)
    csv_path = b["csv"]
    extra = setup.split()
    if extra == ["other-csv"]:
        csv_path, extra = make_dataset(tmp_path / "other", seed=1), []
    before = snapshot(run)
    with pytest.raises(ValueError) as exc:
        trainer.main(PRESET, train_argv(csv_path, run, extra=["--resume", *extra]))
    assert expected in str(exc.value)
    if case != "resume, fewer steps":
        assert "Resume with the original options, or start over with --overwrite" in str(exc.value)
    assert snapshot(run) == before


def _run_resume_ok(case, setup, expected, tmp_path, capsys, request):
    b = request.getfixturevalue("base")
    run = copy_run(b, tmp_path)
    before = snapshot(run)
    # --log-every/--val-every may differ: they do not change the weights
    trainer.main(PRESET, train_argv(b["csv"], run, extra=["--resume", "--log-every", "2"]))
    assert expected in capsys.readouterr().out
    assert snapshot(run) == before


def _run_data(case, setup, expected, tmp_path, capsys, request):
    csv_path, extra = _setup_data(tmp_path, setup)
    out = tmp_path / "run"
    with pytest.raises(ValueError) as exc:
        trainer.main(PRESET, train_argv(csv_path, out, extra=extra))
    assert expected.format(d=os.path.dirname(csv_path)) in str(exc.value)
    assert not out.exists()  # refused before anything was written


def _run_warn(case, setup, expected, tmp_path, capsys, request):
    csv_path, extra = _setup_data(tmp_path, setup)
    with pytest.warns(UserWarning) as rec:
        ds = D.get_dataset("folder", None, pairs_csv=csv_path)
        assert ds.class_names == ("class1", "class2", "class3", "class4", "class5")
    assert any(expected in str(w.message) for w in rec), [str(w.message) for w in rec]
    # declared classes turn the same label into an error
    ds3 = D.get_dataset("folder", None, pairs_csv=csv_path, num_classes=3)
    with pytest.raises(ValueError, match="outside 0..3"):
        D.validate_dataset(ds3, log=None)


def _run_warn_load(case, setup, expected, tmp_path, capsys, request):
    """Loading pair p1 warns (message below); the data still load, unchanged in shape."""
    csv_path, _ = _setup_data(tmp_path, setup)
    d = os.path.dirname(csv_path)
    ds = D.get_dataset("folder", None, pairs_csv=csv_path)
    with pytest.warns(UserWarning) as rec:
        pair = ds.load_pair("p1")
    assert any(expected.format(d=d) in str(w.message) for w in rec), [str(w.message) for w in rec]
    assert pair.moving.shape == (32, 32, 1) and pair.spacing == (1.0, 1.0)  # the fixed image's spacing
    if setup == "outlier":  # 99% of the image squeezed below 1e-5; clipping at percentiles restores it
        assert np.percentile(pair.moving, 99) < 1e-5
        clipped = D.get_dataset("folder", None, pairs_csv=csv_path, clip_percentiles=[0.5, 99.5]).load_pair("p1")
        assert np.percentile(clipped.moving, 99) > 0.5
        # register.py scales a folder run's images with the same function: same array, same warning
        from hypermorph_spatially_adaptive.pair_registration import intensity_normalizer

        raw = np.asarray(nib.load(os.path.join(d, "img", "moving1.nii.gz")).dataobj, np.float32)
        with pytest.warns(UserWarning, match="lies far above its 99th percentile"):
            scaled = intensity_normalizer({"name": "folder"})(raw, "moving image")
        np.testing.assert_array_equal(scaled, pair.moving[..., 0])


def _run_csv_ok(case, setup, expected, tmp_path, capsys, request):
    """The CSV reads to the listed pair ids (strings as written); identification tables keep them too."""
    from hypermorph_spatially_adaptive import artifacts as art

    csv_path, _ = _setup_data(tmp_path, setup)
    ds = D.get_dataset("folder", None, pairs_csv=csv_path)
    assert ds.all_ids() == expected.split()
    assert ds.split_ids("test") == expected.split()[4:]
    assert ds.load_pair(expected.split()[0]).moving.shape == (32, 32, 1)
    folder = _identification_folder(tmp_path / "ident", expected.split())
    ident = art.read_identification(str(folder), "elastic")
    assert ident.pair_ids == expected.split()
    from parameter_identification import _gradient_start_points

    _, h0_g, _ = _gradient_start_points("grid", str(folder), expected.split(), [], ["g_lambda", "g_mu"])  # --init grid
    np.testing.assert_array_equal(h0_g, np.full((5, 2), 0.5))


def _identification_folder(folder, ids=("p3", "p4")):
    """A minimal identification folder (identification.json + identified_parameters.csv) of ``ids``."""
    folder.mkdir(parents=True)
    (folder / "identification.json").write_text(json.dumps({"regularizer": "elastic", "data": {"name": "folder"},
                                                            "method": "grid", "split": "test"}))
    rows = "".join(f"{p},elastic,0.5,0.5,0.6\n" for p in ids)
    (folder / "identified_parameters.csv").write_text("pair_id,regularizer,g_lambda,g_mu,g_mean_dice\n" + rows)
    return folder


def _run_ident(case, setup, expected, tmp_path, capsys, request):
    """A damaged identification folder is refused naming the file (and key)."""
    from hypermorph_spatially_adaptive import artifacts as art

    folder = _identification_folder(tmp_path / "ident")
    meta, table = folder / "identification.json", folder / "identified_parameters.csv"
    if setup == "truncate-json":
        meta.write_bytes(meta.read_bytes()[:30])
    elif setup == "no-regularizer":
        meta.write_text(json.dumps({"data": {"name": "folder"}}))
    elif setup == "header-only":
        table.write_text(table.read_text().splitlines()[0] + "\n")
    elif setup == "latin1-csv":
        table.write_bytes(table.read_text().replace("p3", "p\u00e93").encode("latin-1"))
    with pytest.raises(ValueError) as exc:
        art.read_identification(str(folder), "elastic")
    assert expected.format(f=folder) in str(exc.value)


def _run_grid(case, setup, expected, tmp_path, capsys, request):
    """A grid too large for memory is refused before the model loads and before --out exists."""
    import parameter_identification

    b = request.getfixturevalue("base")
    mp = request.getfixturevalue("monkeypatch")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the grid size was checked")

    mp.setattr(run_folder, "load_run", no_model)
    out = tmp_path / "ident"
    with pytest.raises(ValueError) as exc:
        parameter_identification.main(["--run", str(b["run"]), "--out", str(out), *setup.split()])
    assert expected in str(exc.value)
    assert not out.exists()


def _run_pipeline(case, setup, expected, tmp_path, capsys, request):
    import run_pipeline

    csv_path, extra = _setup_data(tmp_path, setup)
    out = tmp_path / "pipe"
    t0 = time.time()
    with pytest.raises(ValueError) as exc:
        run_pipeline.main(data_argv(csv_path) + ["--quick", "--out", str(out), *extra])
    assert expected.format(d=os.path.dirname(csv_path)) in str(exc.value)
    assert not (out / "runs").exists()  # nothing trained
    assert time.time() - t0 < 60


def _run_weights(case, setup, expected, tmp_path, capsys, request):
    b = request.getfixturevalue("base")
    run = copy_run(b, tmp_path)
    weights = run / "weights.h5"
    if setup == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:  # weights.h5 of a model with another hypernetwork width
        from hypermorph_spatially_adaptive.models import ModelConfig, build_model

        cfg = json.loads((run / "config.json").read_text())["model"]
        other = build_model(ModelConfig.from_dict(dict(cfg, hyp_units=8)))
        other.save_weights(str(weights))
    # the sha256 training recorded tells first (read_run, before any model is built); without one
    # (runs made before it) the load itself fails; both name the checkpoint that rewrites the file
    for message in (expected.format(run=run), f"{run}/weights.h5: cannot load the weights of this elastic_global model"):
        with pytest.raises(ValueError) as exc:
            run_folder.load_run(str(run))
        msg = str(exc.value)
        assert message in msg, msg
        assert f"checkpoint {run}/checkpoints/step_00000002 (step 2) is intact" in msg
        assert "with --resume to rewrite it from that checkpoint" in msg
        _drop_weights_hash(run)


def _drop_weights_hash(run) -> None:
    """As in a run made before config.json recorded the sha256 of weights.h5."""
    cfg = json.loads((run / "config.json").read_text())
    cfg["provenance"].pop("weights_sha256", None)
    (run / "config.json").write_text(json.dumps(cfg))


def _register_files(b, t):
    """Inputs of the register rows in ``t``: the test pair of the base dataset and broken variants."""
    d = os.path.dirname(b["csv"])
    f = {}
    for role in ("fixed", "moving", "fixed_seg", "moving_seg"):
        f[role] = str(t / f"{role}.nii.gz")
        shutil.copyfile(os.path.join(d, "img", f"{role.replace('_seg', '')}4{'_seg' if 'seg' in role else ''}.nii.gz"),
                        f[role])
    img = np.asarray(nib.load(f["fixed"]).dataobj)
    seg = np.asarray(nib.load(f["fixed_seg"]).dataobj)

    def save(name, data, affine=np.eye(4)):
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(data.dtype)  # int64 and complex64 as such
        im = nib.Nifti1Image(data, None, header=hdr)
        im.set_sform(affine, code=1)  # sform only: a singular affine cannot be a qform
        nib.save(im, str(t / name))
        return str(t / name)

    shifted, far, singular = np.eye(4), np.eye(4), np.eye(4)
    shifted[0, 3], far[0, 3], singular[1, 1] = 10.0, 500.0, 0.0
    wrap = seg.astype(np.int64)
    wrap[0, 0] = 2 ** 32 + 2  # would become class 2 in an int32 cast
    f.update(shifted_seg=save("shifted_seg.nii.gz", seg, shifted), far=save("far.nii.gz", img, far),
             singular=save("singular.nii.gz", img, singular), complex=save("complex.nii.gz", img.astype(np.complex64)),
             wrap=save("wrap.nii.gz", wrap), big=str(t / "big.nii"))
    hdr = nib.Nifti1Header()  # a header declaring 20000 x 20000 float32 (1.6 GB) and no data
    hdr.set_data_shape((20000, 20000))
    hdr.set_data_dtype(np.float32)
    (t / "big.nii").write_bytes(hdr.binaryblock + b"\0" * 4)
    for name, edit in (("unfinished", {"finished": False}), ("edited", None)):
        run = t / name
        shutil.copytree(b["run"], run)
        cfg = json.loads((run / "config.json").read_text())
        if edit:
            cfg.update(edit)
        else:
            cfg["model"]["num_classes"] = 5
        (run / "config.json").write_text(json.dumps(cfg))
        f[name] = str(run)
    (t / "ro").mkdir()
    (t / "ro").chmod(0o555)
    return f


def _run_register(case, setup, expected, tmp_path, capsys, request):
    import register

    if "read-only" in case and os.geteuid() == 0:
        pytest.skip("root writes into any folder")
    mp = request.getfixturevalue("monkeypatch")
    mp.setattr(run_folder, "load_run", lambda *a, **k: pytest.fail("a model was loaded before the inputs were checked"))
    b = request.getfixturevalue("base")
    f = _register_files(b, tmp_path)
    fmt = {**f, "t": str(tmp_path)}
    argv = {"--run": str(b["run"]), "--fixed": f["fixed"], "--moving": f["moving"], "--params": ["lambda=0.5", "mu=0.5"],
            "--out-warped": str(tmp_path / "out.nii.gz")}
    given = shlex.split(setup.format(**fmt))
    outs = [a for a in given if a.startswith("--out-")]
    if outs:
        del argv["--out-warped"]
    i = 0
    while i < len(given):  # the row's options replace the defaults
        j = i + 1
        while j < len(given) and not given[j].startswith("--"):
            j += 1
        argv[given[i]] = given[i + 1:j] if given[i] == "--params" else given[i + 1]
        i = j
    flat = [x for k, v in argv.items() for x in ([k, *v] if isinstance(v, list) else [k, v])]
    before = snapshot(tmp_path)
    t0 = time.time()
    with pytest.raises(SystemExit) as exc:
        cli.cli_main(register.main, flat)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and err.startswith("error: ") and "\n" not in err, err
    assert expected.format(**fmt) in err, err
    assert time.time() - t0 < 5  # before any heavy work (the 20000^2 header: no 1.6 GB read)
    (tmp_path / "ro").chmod(0o755)
    assert snapshot(tmp_path) == before  # every input byte-identical, nothing written


@pytest.mark.parametrize("case,kind,setup,expected", CASES, ids=IDS)
def test_bad_input(case, kind, setup, expected, tmp_path, capsys, request):
    globals()[f"_run_{kind.replace('-', '_')}"](case, setup, expected, tmp_path, capsys, request)


# ------------------------------------------------------------------------------------------
# behaviour that is not a refusal
# ------------------------------------------------------------------------------------------
def test_overwrite_removes_derived_outputs_and_files_are_0644(base, tmp_path):
    """--overwrite replaces the run and its identification/; every file it writes is 0644 under umask 022."""
    run = copy_run(base, tmp_path)
    (run / "identification").mkdir()
    (run / "identification" / "identified_parameters.csv").write_text("stale")
    old = os.umask(0o022)
    try:
        trainer.main(PRESET, train_argv(base["csv"], run, steps=1, extra=["--overwrite", "--val-every", "0"]))
    finally:
        os.umask(old)
    assert not (run / "identification").exists()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["finished"] and cfg["final_step"] == 1 and "--overwrite" in cfg["command"]
    for rel in ("config.json", "weights.h5", "train_log.csv", "checkpoints/latest"):
        assert oct((run / rel).stat().st_mode & 0o777) == "0o644", rel


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writers_respect_umask(tmp_path, umask, mode):
    import pandas as pd

    from datasets.atomic import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(str(tmp_path / "a.json"), "{}")
        atomic_write(str(tmp_path / "b.bin"), b"x")
        atomic_write(str(tmp_path / "c.csv"), lambda tmp: pd.DataFrame({"x": [1]}).to_csv(tmp, index=False))
        atomic_write(str(tmp_path / "d.nii.gz"),
                     lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), p))
        atomic_write(str(tmp_path / "e.npz"), lambda p: np.savez_compressed(p, x=np.arange(3)))
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin", "c.csv", "d.nii.gz", "e.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert nib.load(str(tmp_path / "d.nii.gz")).shape == (4, 4)
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin", "c.csv", "d.nii.gz", "e.npz"]  # no temp files left


def test_resume_with_more_steps_records_a_dated_entry(base, tmp_path):
    """Extending the step target is allowed; the original command stays, the resume is recorded."""
    run = copy_run(base, tmp_path)
    old = json.loads((run / "config.json").read_text())
    trainer.main(PRESET, train_argv(base["csv"], run, steps=3, extra=["--resume", "--val-every", "0"]))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["command"] == old["command"]
    assert cfg["finished"] and cfg["final_step"] == 3 and cfg["training"]["steps"] == 3
    (entry,) = cfg["resumed"]
    assert entry["from_step"] == 2 and entry["steps"] == 3 and "--resume" in entry["command"]
    assert entry["changed"] == {"--steps": [2, 3], "--val-every": [1, 0]}
    assert entry["date"][:4].isdigit()
    assert cfg["training"]["lr"] == old["training"]["lr"] and cfg["model"] == old["model"]


def test_cli_prints_one_error_line(capsys):
    def main(argv):
        raise FileNotFoundError(f"pairs CSV not found: /x/{argv[0]}.csv")

    with pytest.raises(SystemExit) as exc:
        cli.cli_main(main, ["mine"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: pairs CSV not found: /x/mine.csv (--debug shows the traceback)\n"
    with pytest.raises(FileNotFoundError):
        cli.cli_main(main, ["mine", "--debug"])


def test_script_error_is_one_line_without_tensorflow_noise(base, tmp_path):
    """A real script run: the only stderr output is the one error line (TF start-up noise filtered)."""
    run = copy_run(base, tmp_path)
    (run / "weights.h5").write_bytes((run / "weights.h5").read_bytes()[:1000])
    _drop_weights_hash(run)  # so that TensorFlow is loaded and fails (the recorded hash would refuse first)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    r = subprocess.run([sys.executable, "parameter_identification.py", "--run", str(run), "--out", str(tmp_path / "i")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run}/weights.h5: cannot load the weights"), r.stderr


def test_pipeline_resumes_unfinished_runs(tmp_path, monkeypatch, capsys):
    """run_pipeline passes --resume for an unfinished run with the same command and says so."""
    import run_pipeline

    csv_path = make_dataset(tmp_path / "data")
    out = tmp_path / "pipe"
    calls = []

    class Stop(Exception):
        pass

    def fake_train(preset, argv):
        calls.append((preset, list(argv)))
        run = argv[argv.index("--out") + 1]
        os.makedirs(run, exist_ok=True)
        cfg = {"preset": preset, "finished": False, "command": ["train.py", *[a for a in argv if a != "--resume"]]}
        run_folder.save_config(run, cfg)
        return run

    def stop(argv):
        raise Stop()

    monkeypatch.setattr(trainer, "main", fake_train)
    import parameter_identification

    monkeypatch.setattr(parameter_identification, "main", stop)
    argv = data_argv(csv_path) + ["--quick", "--out", str(out)]
    with pytest.raises(Stop):
        run_pipeline.main(argv)
    assert all("--resume" not in a for _, a in calls) and len(calls) == 4
    calls.clear()
    with pytest.raises(Stop):
        run_pipeline.main(argv)  # the "killed" runs are resumed, not retrained
    assert [p for p, _ in calls] == run_pipeline.PRESETS
    assert all(a[-1] == "--resume" for _, a in calls)
    assert capsys.readouterr().out.count("unfinished run with the same command found, resuming it") == 4


def test_grid_progress_eta_and_memory_estimate():
    """The ETA format of the identification's progress lines; the memory estimate is the float32
    displacement + warped image of every grid point of one chunk (11 x 11 elastic points at 32 x 32 fit one
    automatic chunk of 256: 121 * 1024 * 3 * 4); a larger grid only adds chunks."""
    from hypermorph_spatially_adaptive import grid_identification as ident

    assert ident.format_eta(3725.4) == "1:02:05" and ident.format_eta(0) == "0:00:00"
    assert ident.grid_bytes("elastic", 11, (32, 32)) == 121 * 1024 * 3 * 4
    assert ident.grid_bytes("diffusion", 11, (16, 16, 16)) == 11 * 4096 * 4 * 4
    assert ident.grid_bytes("elastic", 1000, (32, 32)) == 256 * 1024 * 3 * 4  # auto chunk: 2^18 voxels
    assert ident.grid_bytes("elastic", 11, (192, 128, 192)) == 192 * 128 * 192 * 4 * 4  # one point per chunk
    ident.check_grid_size("elastic", 1000, (32, 32), 4.0)  # a huge grid in automatic chunks fits
    ident.check_grid_size("elastic", 1000, (32, 32), 4.0, batch_size=325520)  # the chunk the message offers fits
    with pytest.raises(ValueError, match="use --batch-size 325520 or less"):
        ident.check_grid_size("elastic", 1000, (32, 32), 4.0, batch_size=325521)


def test_onednn_int32_notice_is_filtered():
    """oneDNN's "DT_INT32 only on platforms with AVX-512" (ERROR level, first int32 transpose) is
    dropped once quiet_onednn_notice ran (models.build_model calls it); nothing else is printed."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = ("import tf_compat, tensorflow as tf\n"
            "tf_compat.quiet_onednn_notice(tf)\n"
            "print(tf.transpose(tf.constant([[1, 2, 3], [4, 5, 6]], tf.int32)).numpy().tolist())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[[1, 4], [2, 5], [3, 6]]", r.stderr
    assert r.stderr == "", r.stderr
