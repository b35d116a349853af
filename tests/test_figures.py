"""Tests for hypermorph_spatially_adaptive.figures (fast; no TensorFlow)."""
import os
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from hypermorph_spatially_adaptive import figures as F

CLASSES = ["lung", "bone", "liver"]
METHODS = ["initial", "diff-g", "diff-sas", "elas-g", "elas-sas"]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def check_png(path, min_h=200, min_w=200):
    """Existing, non-empty PNG of plausible size that is not a single-colour image."""
    assert os.path.isfile(path) and os.path.getsize(path) > 1000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] >= min_h and img.shape[1] >= min_w
    assert img.shape[0] < 5000 and img.shape[1] < 5000
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std(axis=0).max() > 0.02
    q = np.round(rgb * 255).astype(np.int64)
    assert np.unique(q[:, 0] * 65536 + q[:, 1] * 256 + q[:, 2]).size > 20  # distinct colours
    return img


def only_file(folder, name):
    """The output is the only file in ``folder`` (no temp files left behind)."""
    assert sorted(os.listdir(folder)) == [name]


def make_choices(n=12, seed=0, classes=CLASSES, grid=True):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {"pair_id": f"p{i:03d}"}
        for c in ["background"] + list(classes):
            lam, mu = rng.uniform(0, 1, 2)
            if grid:
                lam, mu = np.round(lam, 1), np.round(mu, 1)
            row[f"lambda_{c}"], row[f"mu_{c}"] = lam, mu
        rows.append(row)
    df = pd.DataFrame(rows)
    df.loc[0:3, ["lambda_bone", "mu_bone"]] = 0.1  # identical grid points
    return df


def blob_image(shape, centre, sigma):
    grids = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    return np.exp(-r2 / (2 * sigma ** 2))


def make_pair(shape):
    """Moving/fixed images, fixed labels and two 'method' results with a smooth disp."""
    nd = len(shape)
    centre = [s / 2 for s in shape]
    fixed = blob_image(shape, centre, min(shape) / 4) + 0.3 * blob_image(
        shape, [s / 3 for s in shape], min(shape) / 8)
    moving = blob_image(shape, [c + 2 for c in centre], min(shape) / 4.5)
    seg = np.zeros(shape, dtype=np.int32)
    seg[fixed > 0.3] = 1
    seg[fixed > 0.6] = 2
    seg[fixed > 0.9] = 3
    grids = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    results = {}
    for k, (name, amp) in enumerate([("elas-g", 1.5), ("elas-sas", 6.0)]):
        disp = np.stack([amp * np.sin(2 * np.pi * grids[(j + 1) % nd] / shape[(j + 1) % nd])
                         for j in range(nd)], axis=-1)
        warped = np.clip(moving + 0.05 * k, 0, None)
        wseg = np.roll(seg, k + 1, axis=0)
        results[name] = dict(warped=warped, disp=disp, warped_seg=wseg)
    results["elas-sas"]["dice"] = 0.8834
    results["elas-sas"]["negj"] = 0.04
    return moving, fixed, seg, results


def make_logs():
    logs = {}
    for k, name in enumerate(["elastic_global", "elastic_sa"]):
        step = np.arange(20, 1001, 20)
        loss = -0.3 - 0.4 * (1 - np.exp(-step / 300)) + 0.01 * k
        val = np.full(step.shape, np.nan)
        val[step % 200 == 0] = loss[step % 200 == 0] + 0.02
        logs[name] = pd.DataFrame({"step": step, "loss": loss, "ncc": -loss + 0.05,
                                   "val_loss": val})
    # as read from the trainer's CSV: empty strings where no validation ran
    df = logs["elastic_sa"].copy()
    df["val_loss"] = ["" if np.isnan(v) else str(v) for v in df["val_loss"]]
    df["val_ncc"] = ["" if v == "" else str(-float(v) + 0.04) for v in df["val_loss"]]
    logs["elastic_sa"] = df.iloc[::-1]  # unsorted steps are fine
    return logs


def make_per_pair(n=10, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for m_i, m in enumerate(METHODS):
        for p in range(n):
            d = np.clip(rng.normal(0.7 + 0.04 * m_i, 0.05, 3), 0, 1)
            row = {"pair_id": p, "method": m, **{f"dice_{c}": v for c, v in zip(CLASSES, d)}}
            row["mean_dice"] = float(np.mean(d))
            rows.append(row)
    df = pd.DataFrame(rows)
    df.loc[0, "dice_bone"] = np.nan  # absent class
    return df


# --------------------------------------------------------------------------------------
# deformed grid helper (numeric)
# --------------------------------------------------------------------------------------
def test_grid_positions():
    np.testing.assert_array_equal(F.grid_positions(32, 4), np.arange(1, 32, 4))
    np.testing.assert_array_equal(F.grid_positions(9, 4), [0, 4, 8])
    np.testing.assert_array_equal(F.grid_positions(5, 1), np.arange(5))
    with pytest.raises(ValueError, match="step"):
        F.grid_positions(10, 0)


def test_deformed_grid_zero_disp_gives_straight_lines():
    h, w, step = 20, 13, 4
    rows, cols = F.deformed_grid_lines(np.zeros((h, w, 2)), step)
    pr, pc = F.grid_positions(h, step), F.grid_positions(w, step)
    assert rows.shape == (len(pr), w, 2) and cols.shape == (len(pc), h, 2)
    np.testing.assert_array_equal(rows[:, :, 0], np.repeat(pr[:, None], w, axis=1))
    np.testing.assert_array_equal(rows[:, :, 1], np.tile(np.arange(w), (len(pr), 1)))
    np.testing.assert_array_equal(cols[:, :, 0], np.tile(np.arange(h), (len(pc), 1)))
    np.testing.assert_array_equal(cols[:, :, 1], np.repeat(pc[:, None], h, axis=1))


def test_deformed_grid_translation_shifts_lines():
    h, w, a, b = 16, 12, 1.5, -2.25
    disp = np.zeros((h, w, 2))
    disp[..., 0], disp[..., 1] = a, b
    rows0, cols0 = F.deformed_grid_lines(np.zeros((h, w, 2)), 4)
    rows, cols = F.deformed_grid_lines(disp, 4)
    np.testing.assert_allclose(rows - rows0, np.broadcast_to([a, b], rows.shape))
    np.testing.assert_allclose(cols - cols0, np.broadcast_to([a, b], cols.shape))


def test_deformed_grid_samples_disp_at_each_point():
    h, w = 10, 8
    rng = np.random.default_rng(1)
    disp = rng.normal(size=(h, w, 2))
    rows, cols = F.deformed_grid_lines(disp, 3)
    pr, pc = F.grid_positions(h, 3), F.grid_positions(w, 3)
    r, c = pr[1], 5
    np.testing.assert_allclose(rows[1, c], [r + disp[r, c, 0], c + disp[r, c, 1]])
    r, c = 7, pc[2]
    np.testing.assert_allclose(cols[2, r], [r + disp[r, c, 0], c + disp[r, c, 1]])
    with pytest.raises(ValueError, match=r"\[H, W, 2\]"):
        F.deformed_grid_lines(np.zeros((4, 4, 3)))


def test_swarm_offsets_spread_equal_values_symmetrically():
    off = F._swarm_offsets(np.array([0.5, 0.5, 0.5, 0.9]))
    np.testing.assert_allclose(sorted(off[:3]), [-0.045, 0.0, 0.045])
    assert off[3] == 0.0
    off = F._swarm_offsets(np.full(100, 0.2), width=0.3)
    assert np.abs(off).max() <= 0.3 + 1e-12 and len(np.unique(off)) == 100


# --------------------------------------------------------------------------------------
# 1. parameter scatter
# --------------------------------------------------------------------------------------
def test_regularizer_aliases():
    assert F._regularizer_kind("ELAS") == F._regularizer_kind(" elastic") == "elastic"
    assert F._regularizer_kind("diff") == F._regularizer_kind("Diffusion") == "diffusion"


@pytest.mark.parametrize("reg", ["elastic", "diffusion"])
def test_parameter_scatter_writes_png(tmp_path, reg):
    out = str(tmp_path / "fig2.png")
    assert F.plot_parameter_scatter(make_choices(), CLASSES, reg, out) == out
    img = check_png(out)
    if reg.lower().startswith("elas"):
        assert img.shape[1] > img.shape[0]  # 3 panels side by side
    only_file(tmp_path, "fig2.png")


def test_parameter_scatter_handles_nan_and_many_classes(tmp_path):
    classes = ["a", "b", "c", "d", "e"]
    df = make_choices(classes=classes, grid=False)
    df.loc[2, "mu_c"] = np.nan
    out = F.plot_parameter_scatter(df, classes, "elastic", str(tmp_path / "x.png"),
                                   jitter=0.0, include_background=True)
    check_png(out)


def test_parameter_scatter_errors(tmp_path):
    out = str(tmp_path / "f.png")
    df = make_choices()
    with pytest.raises(ValueError, match="mu_bone"):
        F.plot_parameter_scatter(df.drop(columns=["mu_bone"]), CLASSES, "elastic", out)
    with pytest.raises(ValueError, match="lambda_liver"):  # diffusion needs lambda_<class> only
        F.plot_parameter_scatter(df.drop(columns=["lambda_liver"]), CLASSES, "diffusion", out)
    with pytest.raises(ValueError, match="pair_id"):
        F.plot_parameter_scatter(df.drop(columns=["pair_id"]), CLASSES, "elastic", out)
    with pytest.raises(ValueError, match="regularizer"):
        F.plot_parameter_scatter(df, CLASSES, "bending", out)
    with pytest.raises(ValueError, match="class_names"):
        F.plot_parameter_scatter(df, [], "elastic", out)
    with pytest.raises(ValueError, match="outside"):
        bad = df.copy()
        bad.loc[1, "lambda_lung"] = 3.0
        F.plot_parameter_scatter(bad, CLASSES, "elastic", out)
    with pytest.raises(ValueError, match="no rows"):
        F.plot_parameter_scatter(df.iloc[:0], CLASSES, "elastic", out)
    with pytest.raises(ValueError, match=".png"):
        F.plot_parameter_scatter(df, CLASSES, "elastic", str(tmp_path / "f.pdf"))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# 2. registration panel
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 40), (24, 20, 9)])
def test_registration_panel_2d_and_3d(tmp_path, shape):
    moving, fixed, seg, results = make_pair(shape)
    out = str(tmp_path / "panel.png")
    assert F.plot_registration_panel(moving, fixed, seg, results, out, title="pair 7",
                                     class_names=CLASSES) == out
    img = check_png(out, min_h=250, min_w=700)
    assert img.shape[1] > img.shape[0]  # 7 columns, 2 rows
    only_file(tmp_path, "panel.png")


def test_registration_panel_rows_and_folding(tmp_path):
    moving, fixed, seg, results = make_pair((32, 32))
    # a strongly folding field: the red overlay must appear
    fold = dict(results["elas-sas"])
    disp = np.zeros((32, 32, 2))
    disp[:, 10:20, 1] = -np.linspace(0, 12, 10)[None, :]
    fold["disp"] = disp
    three = {**results, "folding": fold}
    p3 = F.plot_registration_panel(moving, fixed, seg, three, str(tmp_path / "three.png"))
    im3 = check_png(p3)
    assert im3.shape[0] > 0.45 * im3.shape[1]  # 3 rows of 7 square cells (+ titles, colour bars)
    rgb = im3[..., :3]
    red = (rgb[..., 0] > 0.95) & (rgb[..., 1] < 0.05) & (rgb[..., 2] < 0.05)
    assert red.sum() > 20


def test_registration_panel_errors(tmp_path):
    moving, fixed, seg, results = make_pair((24, 20))
    out = str(tmp_path / "p.png")
    with pytest.raises(ValueError, match="same shape"):
        F.plot_registration_panel(moving[:-1], fixed, seg, results, out)
    with pytest.raises(ValueError, match="fixed_seg"):
        F.plot_registration_panel(moving, fixed, seg[:, :-1], results, out)
    with pytest.raises(ValueError, match="non-empty"):
        F.plot_registration_panel(moving, fixed, seg, {}, out)
    bad = {"m": {k: v for k, v in results["elas-g"].items() if k != "warped_seg"}}
    with pytest.raises(ValueError, match="warped_seg"):
        F.plot_registration_panel(moving, fixed, seg, bad, out)
    bad = {"m": dict(results["elas-g"], disp=np.zeros((24, 20, 3)))}
    with pytest.raises(ValueError, match="disp"):
        F.plot_registration_panel(moving, fixed, seg, bad, out)
    bad = {"m": dict(results["elas-g"], warped=np.zeros((20, 24)))}
    with pytest.raises(ValueError, match="warped"):
        F.plot_registration_panel(moving, fixed, seg, bad, out)
    bad = {"m": dict(results["elas-g"], warped_seg=results["elas-g"]["warped_seg"] + 0.5)}
    with pytest.raises(ValueError, match="integer labels"):
        F.plot_registration_panel(moving, fixed, seg, bad, out)
    bad = {"m": dict(results["elas-g"], dice="high")}
    with pytest.raises(ValueError, match="dice"):
        F.plot_registration_panel(moving, fixed, seg, bad, out)
    with pytest.raises(ValueError, match="2D"):
        F.plot_registration_panel(moving[0], fixed[0], seg[0], results, out)
    with pytest.raises(ValueError, match="grid_step"):
        F.plot_registration_panel(moving, fixed, seg, results, out, grid_step=0)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# 3. training curves
# --------------------------------------------------------------------------------------
def test_training_curves(tmp_path):
    out = str(tmp_path / "curves.png")
    assert F.plot_training_curves(make_logs(), out) == out
    check_png(out, min_w=800)
    only_file(tmp_path, "curves.png")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # ordinary file permissions


def test_training_curves_without_validation_column(tmp_path):
    df = make_logs()["elastic_global"].drop(columns=["val_loss"])
    out = str(tmp_path / "a" / "b" / "curves.png")  # missing folders are created
    check_png(F.plot_training_curves({"run": df}, out), min_w=800)
    only_file(tmp_path / "a" / "b", "curves.png")


def test_training_curves_errors(tmp_path):
    out = str(tmp_path / "c.png")
    logs = make_logs()
    logs["elastic_sa"] = logs["elastic_sa"].drop(columns=["ncc"])
    with pytest.raises(ValueError, match=r"elastic_sa.*ncc"):
        F.plot_training_curves(logs, out)
    with pytest.raises(ValueError, match="non-empty"):
        F.plot_training_curves({}, out)
    with pytest.raises(ValueError, match="no rows"):
        F.plot_training_curves({"r": make_logs()["elastic_global"].iloc[:0]}, out)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# 4. Dice box plots
# --------------------------------------------------------------------------------------
def test_dice_boxplots(tmp_path):
    out = str(tmp_path / "dice.png")
    df = make_per_pair()
    df = df[df["method"] != "diff-g"]
    assert F.plot_dice_boxplots(df, CLASSES, out, method_order=["elas-sas", "initial"]) == out
    img = check_png(out, min_w=800)
    assert img.shape[1] > img.shape[0]
    only_file(tmp_path, "dice.png")


def test_dice_boxplots_errors(tmp_path):
    out = str(tmp_path / "d.png")
    df = make_per_pair()
    with pytest.raises(ValueError, match="dice_liver"):
        F.plot_dice_boxplots(df.drop(columns=["dice_liver"]), CLASSES, out)
    with pytest.raises(ValueError, match="mean_dice"):
        F.plot_dice_boxplots(df.drop(columns=["mean_dice"]), CLASSES, out)
    with pytest.raises(ValueError, match="method"):
        F.plot_dice_boxplots(df.drop(columns=["method"]), CLASSES, out)
    with pytest.raises(ValueError, match="nope"):
        F.plot_dice_boxplots(df, CLASSES, out, method_order=["nope"])
    with pytest.raises(ValueError, match="no rows"):
        F.plot_dice_boxplots(df.iloc[:0], CLASSES, out)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# atomic writes, no TensorFlow
# --------------------------------------------------------------------------------------
def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "dice.png"
    out.write_bytes(b"old")

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        F.plot_dice_boxplots(make_per_pair(), CLASSES, str(out))
    assert out.read_bytes() == b"old"
    only_file(tmp_path, "dice.png")


def test_module_does_not_import_tensorflow():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; import hypermorph_spatially_adaptive.figures; "
            "assert 'tensorflow' not in sys.modules; "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
