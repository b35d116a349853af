"""register.py / pair_registration: one pair, any geometry, ITK fields (docs/register.md "Register one pair")."""
import os

import numpy as np
import pytest

from hypermorph_spatially_adaptive import pair_geometry as geo
from hypermorph_spatially_adaptive.pair_registration import resolve_params
from conftest import TINY_ARCH  # noqa: E402

ARCH = [*TINY_ARCH, "--hyp-units", "16"]  # a last option wins
NAMES = ["lambda_background", "lambda_lung", "mu_background", "mu_lung"]


# ---------------------------------------------------------------- no model needed

def test_resolve_params_names_shorthand_vector_and_errors():
    assert resolve_params({"lambda": 0.2, "mu_lung": 0.9, "mu": 0.1}, NAMES).tolist() == \
        pytest.approx([0.2, 0.2, 0.1, 0.9])
    assert resolve_params(["lambda=0.3", "mu=0.4", "lambda_lung=1"], NAMES).tolist() == pytest.approx([0.3, 1, 0.4, 0.4])
    assert resolve_params(["0.1", "0.2", "0.3", "0.4"], NAMES).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    for bad, msg in ((["lambda=0.3"], r"\['mu_background', 'mu_lung'\] not given"),
                     (["kappa=0.1", "lambda=0", "mu=0"], "unknown parameter 'kappa'"),
                     (["0.1", "0.2"], "2 parameter values given, the model takes 4"),
                     (["lambda=2", "mu=0"], r"\[0, 1\]: lambda_background=2, lambda_lung=2")):
        with pytest.raises(ValueError, match=msg):
            resolve_params(bad, NAMES)


def _affine(spacing, flip_axes=(), shape=None, origin=(3.0, -7.0, 11.0), rotate=0.0):
    """4x4 with the given spacing, axes in ``flip_axes`` reversed (origin at the far end), an
    optional rotation (radians) about z."""
    A = np.eye(4)
    A[:3, :3] = np.diag(list(spacing) + [1.0] * (3 - len(spacing)))
    A[:3, 3] = origin
    for a in flip_axes:
        A[:3, 3] += A[:3, a] * (shape[a] - 1)
        A[:3, a] *= -1
    c, s = np.cos(rotate), np.sin(rotate)
    R = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return R @ A


def test_model_grid_is_the_fixed_grid_in_training_geometry_and_undoes_flips():
    A = _affine((1.5, 1.5))
    grid = geo.model_grid(A, (32, 32), (32, 32))
    np.testing.assert_allclose(grid.affine, A, atol=1e-12)
    assert grid.spacing == pytest.approx((1.5, 1.5)) and grid.flips == (False, False)
    # the same world grid stored with axis 0 reversed and at half the spacing along axis 1
    B = _affine((1.5, 0.75), flip_axes=(0,), shape=(32, 64))
    B[:3, 3] += np.array([0.0, -0.375, 0.0])  # keep the field of view (voxel edges) where A has it
    g2 = geo.model_grid(B, (32, 64), (32, 32))
    np.testing.assert_allclose(g2.affine, A, atol=1e-12)
    assert g2.flips == (True, False) and geo.spacing_warning(g2, (1.5, 1.5)) is None
    # twice the field of view: spacing 3 mm, a warning naming both spacings
    assert "trained at (1.5, 1.5)" in geo.spacing_warning(geo.model_grid(A, (64, 64), (32, 32)), (1.5, 1.5))


def _smooth_field(shape, amp, seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    d = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 2.0) for _ in range(3)], axis=-1)
    return amp * d / np.abs(d).max()


def _sitk_warp(moving_path, fixed_path, field_path):
    sitk = pytest.importorskip("SimpleITK")
    fixed = sitk.ReadImage(fixed_path, sitk.sitkFloat64)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(field_path), sitk.sitkVectorFloat64))
    out = sitk.Resample(sitk.ReadImage(moving_path, sitk.sitkFloat64), fixed, tx, sitk.sitkLinear, -1.0)
    return np.transpose(sitk.GetArrayFromImage(out))  # ITK arrays are z, y, x


def _inside(points, affine, shape, margin=0.0):
    inv = np.linalg.inv(affine)
    idx = (points @ inv[:3, :3].T + inv[:3, 3])[..., :len(shape)]
    return np.all((idx >= margin) & (idx <= np.asarray(shape) - 1 - margin), axis=-1)


def test_itk_field_3d_applied_by_simpleitk_reproduces_our_warp(tmp_path):
    """Oblique, anisotropic, flipped grids; an analytic field: SimpleITK = our warp to 1e-4."""
    import nibabel as nib

    fshape, mshape = (14, 12, 10), (16, 11, 9)
    A_f = _affine((1.2, 0.8, 2.0), flip_axes=(1,), shape=fshape, rotate=0.3)
    A_m = _affine((1.0, 1.1, 1.7), flip_axes=(0, 2), shape=mshape, origin=(4.0, -6.0, 12.0), rotate=-0.1)
    centre = lambda A, n: A @ np.array([(k - 1) / 2 for k in n] + [1.0])  # noqa: E731
    A_m[:3, 3] += (centre(A_f, fshape) - centre(A_m, mshape))[:3]  # overlapping fields of view
    rng = np.random.default_rng(0)
    moving = rng.uniform(0, 1, mshape).astype(np.float32)
    d_mm = _smooth_field(fshape, 3.0, 1)
    points = geo.grid_points(A_f, fshape) + d_mm
    ours = geo.sample_at_world(moving, A_m, points, 1)
    for name, img in (("m", nib.Nifti1Image(moving, A_m)), ("f", nib.Nifti1Image(np.zeros(fshape, np.float32), A_f)),
                      ("w", geo.itk_displacement_image(d_mm, A_f))):
        nib.save(img, str(tmp_path / f"{name}.nii.gz"))
    theirs = _sitk_warp(str(tmp_path / "m.nii.gz"), str(tmp_path / "f.nii.gz"), str(tmp_path / "w.nii.gz"))
    inside = _inside(points, A_m, mshape)
    assert inside.mean() > 0.5
    assert np.abs(theirs - ours)[inside].max() < 1e-4
    # the voxel displacement is the same map: A_f (p + u) = A_f p + d
    u = geo.voxel_displacement(d_mm, A_f)
    np.testing.assert_allclose(u @ A_f[:3, :3].T, d_mm, atol=1e-4)


# ---------------------------------------------------------------- with a trained (1 step) SA model

PARAMS = ["lambda=0.4", "mu=0.6"]
REFINE = 5  # the 1-step network's field is ~0; refinement gives the tests a field of ~0.5 voxel


def _variant(flip0: bool, up1: int):
    """The canonical 32 x 32 grid (identity affine) stored with axis 0 reversed and/or axis 1
    sampled ``up1`` times finer over the same field of view: ``(affine, geom(array, order))``."""
    from scipy import ndimage

    A = _affine((1.0, 1.0 / up1), flip_axes=(0,) if flip0 else (), shape=(32, 32 * up1), origin=(0, 0, 0))
    A[1, 3] -= 0.5 - 0.5 / up1
    y = (np.arange(32 * up1) + 0.5) / up1 - 0.5  # fine voxel centres in coarse indices

    def geom(a, order):
        coords = np.meshgrid(np.arange(32.0), y, indexing="ij")
        a = ndimage.map_coordinates(a.astype(np.float64), coords, order=order, mode="nearest").astype(a.dtype)
        return a[::-1] if flip0 else a

    return A, geom


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 1-step elastic SA run on 32 x 32 phantoms, its first test pair as NIfTI, one loaded
    registrar, and the pair registered in the canonical and two resampled geometries."""
    import nibabel as nib

    from hypermorph_spatially_adaptive import artifacts as art
    from hypermorph_spatially_adaptive.pair_registration import PairRegistrar
    from hypermorph_spatially_adaptive.trainer import main as train_main

    tmp = tmp_path_factory.mktemp("register")
    run = str(tmp / "sa")
    data = ["--dataset", "synthetic", "--image-size", "32", "32", "--num-pairs", "3", "--cache-dir", str(tmp / "cache")]
    train_main("elastic_sa", data + ARCH + ["--out", run, "--steps", "1", "--val-every", "0", "--log-every", "1"])
    info = art.read_run(run)
    dataset = art.load_dataset(info.config)
    pair = dataset.load_pair(dataset.split_ids("test")[0])
    files = {}
    for key in ("fixed", "moving"):
        files[key] = str(tmp / f"{key}.nii.gz")
        files[key + "_seg"] = str(tmp / f"{key}_seg.nii.gz")
        nib.save(nib.Nifti1Image(getattr(pair, key)[..., 0], pair.affine), files[key])
        nib.save(nib.Nifti1Image(getattr(pair, key + "_seg").astype(np.int16), pair.affine), files[key + "_seg"])
    registrar = PairRegistrar(run)
    results, inputs = {}, {}
    for name, flip0, up1 in (("canonical", False, 1), ("flip", True, 1), ("flip_fine", True, 2)):
        A, geom = _variant(flip0, up1)
        x = inputs[name] = {"affine": A, "geom": geom}
        for key in ("fixed", "moving"):
            x[key] = geom(getattr(pair, key)[..., 0], 1)
            x[key + "_seg"] = geom(getattr(pair, key + "_seg"), 0)
        results[name] = registrar((x["fixed"], A), (x["moving"], A), PARAMS, (x["fixed_seg"], A),
                                  (x["moving_seg"], A), refine=REFINE)
    return {"tmp": tmp, "run": run, "info": info, "pair": pair, "files": files, "registrar": registrar,
            "results": results, "inputs": inputs}


def test_command_equals_pipeline_and_identification_folder(setup, tmp_path):
    """The command on NIfTI files = inference.py's Registrar + Refiner on the dataset pair."""
    import json

    import nibabel as nib
    import pandas as pd

    import eval_metrics
    import register
    from hypermorph_spatially_adaptive import artifacts as art
    from hypermorph_spatially_adaptive.refinement import Refiner
    from hypermorph_spatially_adaptive.forward import Registrar

    pair, info, f = setup["pair"], setup["info"], setup["files"]
    names = art.sa_columns("elastic", info.class_names)
    hyp = np.linspace(0.1, 0.9, len(names)).astype(np.float32)
    out = {k: str(tmp_path / f"{k}.nii.gz") for k in ("w", "ws", "d", "itk")}
    register.main(["--fixed", f["fixed"], "--moving", f["moving"], "--fixed-seg", f["fixed_seg"], "--moving-seg",
                   f["moving_seg"], "--run", setup["run"], "--out-warped", out["w"], "--out-disp", out["d"],
                   "--out-itk-warp", out["itk"], "--out-warped-seg", out["ws"], "--refine", "3",
                   "--params", *[f"{n}={v}" for n, v in zip(names, hyp)]])
    model, cfg = setup["registrar"].model, info.config  # inference.py's calls on the same model:
    _, disp = Registrar(model)(pair.moving[None], pair.fixed[None], hyp[None])
    from hypermorph_spatially_adaptive.configs import RefineConfig  # the command-line refinement options

    u, _, _ = Refiner.from_config(cfg, options=RefineConfig())(
        pair.moving[None], pair.fixed[None], disp, hyp[None], pair.fixed_seg[None], 3, 0.1)
    assert np.abs(u[0]).max() > 0.05  # a field to compare, not zeros
    np.testing.assert_allclose(nib.load(out["d"]).get_fdata(), u[0], atol=1e-5)
    np.testing.assert_array_equal(nib.load(out["ws"]).get_fdata(), eval_metrics.warp_labels(pair.moving_seg, u[0]))
    np.testing.assert_allclose(nib.load(out["w"]).get_fdata(), eval_metrics.warp_image(pair.moving[..., 0], u[0]),
                               atol=1e-5)
    for path in out.values():
        np.testing.assert_array_equal(nib.load(path).affine, pair.affine)
    # the same parameters from an identification folder (population protocol: one setting)
    ident = tmp_path / "ident"
    ident.mkdir()
    pd.DataFrame([{"pair_id": p, **dict(zip(names, hyp.tolist()))} for p in ("a", "b")]).to_csv(
        ident / art.IDENTIFIED_PARAMETERS, index=False)
    (ident / art.IDENTIFICATION_META).write_text(json.dumps({"regularizer": "elastic", "protocol": "population",
                                                             "class_names": info.class_names, "data": info.data}))
    np.testing.assert_array_equal(setup["registrar"].check(f["fixed"], f["moving"], ident=str(ident)).hyp, hyp)


def test_resampled_input_gives_the_canonical_warped_labels(setup):
    """Axis 0 reversed: the same labels and world field (1e-5 mm). Axis 1 also at half the spacing
    (64 columns): the warped labels agree on >= 99 % of the fine voxels (measured 99.8 %) with the
    canonical field applied on the fine grid, the field within a mean 0.03 mm (measured 0.014 mm,
    max 0.17 mm of a field up to 0.5 mm): the difference is the network seeing resampled images."""
    canon, flip, fine = (setup["results"][k] for k in ("canonical", "flip", "flip_fine"))
    assert np.abs(canon.disp).max() > 0.1
    np.testing.assert_array_equal(flip.warped_seg, canon.warped_seg[::-1])
    np.testing.assert_allclose(flip.disp_mm, canon.disp_mm[::-1], atol=1e-5)
    np.testing.assert_allclose(flip.disp, canon.disp[::-1] * [-1, 1], atol=1e-5)
    x = setup["inputs"]["flip_fine"]
    d = geo.world_displacement(canon.u_model, canon.grid, x["affine"], fine.warped_seg.shape)
    expected = geo.sample_at_world(x["moving_seg"], x["affine"], geo.grid_points(x["affine"], d.shape[:-1]) + d, 0)
    assert np.mean(fine.warped_seg == expected) >= 0.99
    assert np.abs(fine.disp_mm - d).mean() < 0.03


def test_itk_field_2d_applied_by_simpleitk_reproduces_our_warp(setup, tmp_path):
    """Flipped, anisotropic 2D input: SimpleITK applies our ITK field and reproduces our warp."""
    import nibabel as nib

    from hypermorph_spatially_adaptive.pair_registration import save_result

    res, x = setup["results"]["flip_fine"], setup["inputs"]["flip_fine"]
    A = x["affine"]
    paths = {k: str(tmp_path / f"{k}.nii.gz") for k in ("fixed", "moving", "w", "itk")}
    for key in ("fixed", "moving"):
        nib.save(nib.Nifti1Image(x[key], A), paths[key])
    save_result(res, warped=paths["w"], itk_warp=paths["itk"])
    assert nib.load(paths["itk"]).shape == (32, 64, 1, 1, 2)
    assert np.abs(res.disp_mm).max() > 0.1
    theirs = _sitk_warp(paths["moving"], paths["fixed"], paths["itk"])
    ours = nib.load(paths["w"]).get_fdata()
    inside = _inside(geo.grid_points(A, ours.shape) + res.disp_mm, A, ours.shape)
    assert inside.mean() > 0.9
    assert np.abs(theirs - ours)[inside].max() < 1e-4  # intensities in [0, 1]


def test_identify_gradient_on_the_pair(setup):
    f = setup["files"]
    res = setup["registrar"](f["fixed"], f["moving"], fixed_seg=f["fixed_seg"], moving_seg=f["moving_seg"],
                             identify="gradient", gradient_steps=2)
    assert res.hyp.shape == (8,) and np.all((res.hyp > 0) & (res.hyp < 1)) and "identify" in res.seconds
def test_bad_inputs_one_line_errors_before_loading(setup, tmp_path, capsys, monkeypatch):
    import nibabel as nib

    import register
    from hypermorph_spatially_adaptive import cli, run_folder

    monkeypatch.setattr(run_folder, "load_run", lambda *a, **k: pytest.fail("model loaded before the inputs were checked"))
    f = setup["files"]
    bad_seg, vol = str(tmp_path / "bad_seg.nii.gz"), str(tmp_path / "vol.nii.gz")
    seg = nib.load(f["moving_seg"])
    nib.save(nib.Nifti1Image(np.where(np.asarray(seg.dataobj) == 2, 7, np.asarray(seg.dataobj)).astype(np.int16),
                             seg.affine), bad_seg)
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 8), np.float32), np.eye(4)), vol)
    out = str(tmp_path / "o" / "w.nii.gz")
    base = ["--run", setup["run"], "--out-warped", out]
    cases = [
        (["--fixed", str(tmp_path / "nope.nii.gz"), "--moving", f["moving"], "--params", "lambda=0", "mu=0"],
         "fixed image not found: "),
        (["--fixed", f["fixed"], "--moving", f["moving"], "--moving-seg", bad_seg, "--params", "lambda=0", "mu=0"],
         "labels outside 0..3 (the model's classes lung, bone, liver): [0, 1, 3, 7]"),
        (["--fixed", vol, "--moving", f["moving"], "--params", "lambda=0", "mu=0"],
         "is 3D (32, 32, 8), but the model"),
        (["--fixed", f["fixed"], "--moving", f["moving"], "--params", "lambda=0"], "not given"),
        (["--fixed", f["fixed"], "--moving", f["moving"], "--identify", "grid"], "needs both segmentations"),
        (["--fixed", f["fixed"], "--moving", f["moving"], "--params", "lambda=0", "mu=0", "--refine", "2"],
         "needs the fixed segmentation"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as exc:
            cli.cli_main(register.main, base + argv)
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, err
    assert not os.path.exists(os.path.dirname(out))


# ---------------------------------------------------------------- issue 36 (refusals: tests/test_bad_inputs.py)
def test_register_warns_partial_overlap_and_an_all_background_sa_map(setup, tmp_path):
    """A moving image shifted by 24 of 32 columns covers 25 % of the fixed field of view: a warning
    with that number; an all-background fixed segmentation of an SA run: a warning."""
    import nibabel as nib

    img = nib.load(setup["files"]["fixed"])
    A = np.asarray(img.affine)
    moved = A.copy()
    moved[:3, 3] += A[:3, 1] * 24  # 24 voxels along array axis 1
    data = np.asarray(img.get_fdata(), np.float32)
    with pytest.warns(UserWarning, match=r"covers only 25 % of the field of view"):
        setup["registrar"].check((data, A), (data, moved), params=[0.5] * 8)
    with pytest.warns(UserWarning, match="is all background"):
        setup["registrar"].check((data, A), (data, A), fixed_seg=(np.zeros(data.shape, np.int16), A),
                                 params=[0.5] * 8)


def test_register_refuses_an_unfinished_run_naming_the_command(setup, tmp_path):
    """A run whose --resume was interrupted (config finished false, weights.h5 of an earlier step) or
    whose weights.h5 was replaced is refused by register, naming the command that finishes it."""
    import json
    import shutil

    import register
    from hypermorph_spatially_adaptive import artifacts as art

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    cfg = json.loads((run / art.CONFIG).read_text())
    (run / art.CONFIG).write_text(json.dumps(dict(cfg, finished=False)))
    f = setup["files"]
    argv = ["--fixed", f["fixed"], "--moving", f["moving"], "--run", str(run), "--params", "lambda=0.5", "mu=0.5",
            "--out-warped", str(tmp_path / "w.nii.gz")]
    with pytest.raises(ValueError, match=r"training is unfinished \(.*finished: false.*\); finish it first: python "
                                         r"train_hypermorph_elastic_sa.py .*--resume"):
        register.main(argv)
    (run / art.CONFIG).write_text(json.dumps(cfg))
    (run / art.WEIGHTS).write_bytes((run / art.WEIGHTS).read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"is not the file training finished with"):
        register.main(argv)
    assert not os.path.exists(tmp_path / "w.nii.gz")
