"""--profile paper | authors (docs/fidelity.md): every switch changes exactly what it says, the
correct elastic axis pairing is pinned, the authors' defects are shown numerically, and the authors
profile runs end to end (train -> identify -> infer) with the stages refusing a run of another profile."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import regularizers
from conftest import TINY_ARCH
from hypermorph_spatially_adaptive import grid_identification as ident
from hypermorph_spatially_adaptive.losses import loss_terms, ncc_map, ncc_map_voxelmorph
from hypermorph_spatially_adaptive.params import ParamSpec
from hypermorph_spatially_adaptive.profiles import AUTHORS, PAPER, Fidelity, check_same_profile
from hypermorph_spatially_adaptive.trainer import build_parser, resolve_fidelity, sample_hyperparameters

CLASSES = ["lung", "bone", "liver"]


def _linear_field(n, jac):
    """``u(x) = J x`` on an n x n grid, ``[1, n, n, 2]``; channel j = displacement along array axis j."""
    x = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).astype(np.float32)
    return tf.constant((x @ np.asarray(jac, np.float32).T)[None])


# ---- the dataclass and the command line ------------------------------------------------------------
def test_fidelity_round_trip_validation_and_flags():
    assert Fidelity() == PAPER and Fidelity.from_dict(AUTHORS.to_dict()) == AUTHORS
    assert Fidelity.of("authors", ncc="clipped").ncc == "clipped"
    with pytest.raises(ValueError, match="ncc"):
        Fidelity(ncc="nope")
    with pytest.raises(ValueError, match="oversample"):
        Fidelity(oversample_endpoints=1.5)
    with pytest.raises(ValueError, match="unknown fidelity"):
        Fidelity.from_dict({"colour": "red"})
    # a run made before --profile: paper with its own three recorded settings
    legacy = {"model": {"int_resolution": 1}, "loss": {"reg_field": "svf", "oversample_endpoints": 0.1}}
    assert Fidelity.from_run_config(legacy) == Fidelity(int_resolution=1, reg_field="svf", oversample_endpoints=0.1)
    # the profile sets defaults, each flag overrides its own setting only
    a = build_parser("elastic_global").parse_args(["--profile", "authors", "--reg-field", "disp"])
    fid = resolve_fidelity(a)
    assert fid == Fidelity.of("authors", reg_field="disp")
    assert (a.int_resolution, a.reg_field, a.oversample_endpoints) == (1, "disp", 0.2)
    p = build_parser("elastic_global").parse_args([])
    assert resolve_fidelity(p) == PAPER and (p.int_resolution, p.reg_field, p.oversample_endpoints) == (2, "disp", 0.0)
    assert AUTHORS.constrained(False) and not AUTHORS.constrained(True) and not PAPER.constrained(False)


def test_check_same_profile_refuses_mixed_runs():
    paper, authors = {"fidelity": PAPER.to_dict()}, {"fidelity": AUTHORS.to_dict()}
    assert check_same_profile({"a": authors, "b": authors}, "authors") == AUTHORS
    with pytest.raises(ValueError, match="different fidelity"):
        check_same_profile({"a": paper, "b": authors})
    with pytest.raises(ValueError, match="--profile paper"):
        check_same_profile({"a": authors}, "paper")
    # a field that does not change what a hyperparameter means may differ between runs
    check_same_profile({"a": paper, "b": {"fidelity": Fidelity(int_resolution=1).to_dict()}})


# ---- energy: field, scale, axis pairing --------------------------------------------------------------
def test_energy_on_svf_vs_displacement_of_a_known_field():
    """An SVF v = eps x integrates (scaling and squaring, voxelmorph's VecInt) to u = (e^eps - 1) x, so the
    lambda-term density is 2 eps^2 on the SVF (--reg-field svf, authors' code) and 2 (e^eps - 1)^2 on the
    displacement (--reg-field disp, paper text) at lambda = 1; the trainer feeds the model's svf / disp
    output accordingly (the same two fields its outputs carry)."""
    from tf_compat import import_voxelmorph

    _, vxm, _ = import_voxelmorph()
    eps, n = 0.05, 16
    v = _linear_field(n, [[eps, 0], [0, eps]])
    u = vxm.layers.VecInt(method="ss", int_steps=7)(v)
    inner = (slice(None), slice(1, n // 2), slice(1, n // 2))  # x + u stays inside the grid
    e_svf = regularizers.elastic_energy_density(v, [1.0], [0.0]).numpy()[inner]
    e_disp = regularizers.elastic_energy_density(u, [1.0], [0.0]).numpy()[inner]
    np.testing.assert_allclose(e_svf, 2 * eps ** 2, rtol=1e-4)
    np.testing.assert_allclose(e_disp, 2 * np.expm1(eps) ** 2, rtol=2e-3)
    assert e_disp.mean() / e_svf.mean() == pytest.approx((np.expm1(eps) / eps) ** 2, rel=2e-3)  # 1.05: 5 % apart


def test_uniform_expansion_and_rotation_pin_the_axis_pairing():
    """Correct pairing: u = eps x (2D) has lambda-term density lambda/2 (2 eps)^2 = 2 eps^2 at lambda = 1
    and no mu-term beyond its strain; an infinitesimal rotation has zero mu-term. The authors' pairing
    (flow channel 0 with the last array axis, reimplemented here in numpy) gets both wrong."""
    eps, n = 0.01, 12
    inner = (slice(None), slice(0, n - 1), slice(0, n - 1))
    expand = _linear_field(n, [[eps, 0], [0, eps]])
    lam_term = regularizers.elastic_energy_density(expand, [1.0], [0.0]).numpy()[inner]
    np.testing.assert_allclose(lam_term, 2 * eps ** 2, rtol=1e-4)
    rot = _linear_field(n, [[0, -eps], [eps, 0]])
    mu_term = regularizers.elastic_energy_density(rot, [0.0], [1.0]).numpy()[inner]
    np.testing.assert_allclose(mu_term, 0.0, atol=1e-9)

    def authors_density(u, lam, mu):  # their regularizers.py, 2D: dx along the LAST axis paired with channel 0
        u = u.numpy()
        dy = np.pad(np.diff(u, axis=1), [(0, 0), (0, 1), (0, 0), (0, 0)])
        dx = np.pad(np.diff(u, axis=2), [(0, 0), (0, 0), (0, 1), (0, 0)])
        d = [dx, dy]
        e = lam / 2 * (dx[..., 0] + dy[..., 1]) ** 2
        for i in range(2):
            for j in range(2):
                e = e + mu / 4 * (d[j][..., i] + d[i][..., j]) ** 2
        return e[inner]

    np.testing.assert_allclose(authors_density(expand, 1.0, 0.0), 0.0, atol=1e-12)      # expansion: no lambda-term
    np.testing.assert_allclose(authors_density(rot, 0.0, 1.0), 2 * eps ** 2, rtol=1e-4)  # rotation: mu-term > 0


def test_grad_scale_voxelmorph_is_one_over_d_squared_of_ours():
    """voxelmorph's Grad('l2') on u = eps x_0 (2D, n x n): (1/D) (eps^2 / D) = eps^2 / 4; ours averages
    the squared gradient norm over all voxels (last row 0): eps^2 (n - 1) / n. Ratio 1/D^2 * n/(n-1)."""
    from tf_compat import import_voxelmorph

    _, vxm, _ = import_voxelmorph()
    eps, n = 0.1, 8
    u = _linear_field(n, [[eps, 0], [0, 0]])
    ours = float(regularizers.diffusion_regularizer(u, [1.0])[0])
    vm = float(regularizers.diffusion_regularizer_voxelmorph(u, [1.0])[0])
    assert ours == pytest.approx(eps ** 2 * (n - 1) / n, rel=1e-5)
    assert vm == pytest.approx(eps ** 2 / 4, rel=1e-5)
    assert vm / ours == pytest.approx(1 / 4 * n / (n - 1), rel=1e-5)
    rng = np.random.default_rng(1)
    r = tf.constant(rng.normal(size=(2, 9, 10, 2)).astype(np.float32))  # against voxelmorph itself
    np.testing.assert_allclose(regularizers.diffusion_regularizer_voxelmorph(r, [0.3, 0.7]).numpy(),
                               np.array([0.3, 0.7]) * vxm.losses.Grad("l2").loss(None, r).numpy(), rtol=1e-5)
    # the loss switch: a diffusion loss under the authors' profile carries voxelmorph's scale
    spec, f = ParamSpec("diffusion", False, 3), tf.zeros((1, n, n, 1))
    t = {fid.diffusion_energy: float(loss_terms(spec, f, f, u, [[1.0]], fidelity=fid)["regularization"][0])
         for fid in (PAPER, AUTHORS)}
    assert t == pytest.approx({"sum": ours, "voxelmorph": vm}, rel=1e-5)


# ---- similarity: NCC numerics and weight --------------------------------------------------------------
def test_ncc_clamp_scores_anticorrelation_zero():
    from tf_compat import import_voxelmorph

    _, vxm, _ = import_voxelmorph()
    rng = np.random.default_rng(2)
    f = tf.constant(rng.random((1, 24, 24, 1)).astype(np.float32))
    anti = 1.0 - f
    assert float(tf.reduce_mean(ncc_map(f, anti, 5))) > 0.99  # ours squares the signed cross term
    vm = ncc_map_voxelmorph(f, anti, 5).numpy()[0]
    assert vm[2:-2, 2:-2].max() < 1e-6  # cross term clamped at eps: ~0 wherever the window is inside
    assert vm[0, 0] > 0.01  # border: the zero padding (in both images) correlates positively
    w = tf.constant((0.6 * f.numpy() + 0.4 * rng.random((1, 24, 24, 1))).astype(np.float32))
    np.testing.assert_allclose(ncc_map_voxelmorph(f, w, 5).numpy(), vxm.losses.NCC(win=5).ncc(f, w).numpy()[..., 0],
                               atol=2e-5)
    # the zero-padded border: a corner window of a constant-offset image differs from ours
    assert not np.allclose(ncc_map_voxelmorph(f, w, 5).numpy()[0, 0, 0], ncc_map(f, w, 5).numpy()[0, 0, 0])


def test_similarity_weight_paper_vs_authors_clipped():
    rng = np.random.default_rng(4)
    f = tf.constant(rng.random((2, 16, 16, 1)).astype(np.float32))
    w = tf.constant(rng.random((2, 16, 16, 1)).astype(np.float32))
    u = tf.zeros((2, 16, 16, 2))
    spec = ParamSpec("elastic", False, 3)
    hyp = tf.constant([[0.2, 0.3], [0.9, 0.6]])  # lambda + mu = 0.5 and 1.5
    ncc = loss_terms(spec, f, w, u, hyp)["ncc"].numpy()
    paper = loss_terms(spec, f, w, u, hyp, fidelity=PAPER)["similarity"].numpy()
    only_weight = Fidelity.of("paper", similarity_weight="authors")  # the one switch, NCC numerics unchanged
    authors = loss_terms(spec, f, w, u, hyp, fidelity=only_weight)["similarity"].numpy()
    np.testing.assert_allclose(paper, [-1.5 * ncc[0], -0.5 * ncc[1]], rtol=1e-5)
    np.testing.assert_allclose(authors, [-0.5 * ncc[0], 0.0], rtol=1e-5, atol=1e-7)  # 1 - 1.5 clipped at 0


def test_global_elastic_batch_broadcast_defect():
    """The authors' global elastic image loss multiplies the weights [B, 1, 1] by the per-sample NCC
    [B]: the product broadcasts to [B, 1, B], whose mean is mean(w) * mean(NCC), not mean(w * NCC)."""
    w = np.array([0.9, 0.1])[:, None, None]
    ncc = np.array([0.2, 0.8])
    assert (w * ncc).shape == (2, 1, 2)
    assert (w * ncc).mean() == pytest.approx(w.mean() * ncc.mean())
    assert (w[:, 0, 0] * ncc).mean() == pytest.approx(0.13) and w.mean() * ncc.mean() == pytest.approx(0.25)


# ---- sampling ------------------------------------------------------------------------------------------
def test_endpoint_frequency_within_binomial_bounds():
    n, p = 4000 * 2, 0.2
    h = sample_hyperparameters(5, 1, 4000, 2, oversample=p).numpy()
    ends = int(np.sum((h == 0) | (h == 1)))
    sd = np.sqrt(n * p * (1 - p))
    assert abs(ends - n * p) < 4.5 * sd, ends
    assert abs(int(np.sum(h == 1)) - ends / 2) < 4.5 * np.sqrt(ends / 4)
    none = sample_hyperparameters(5, 1, 4000, 2).numpy()
    assert int(np.sum((none == 0) | (none == 1))) == 0


def test_constrained_sampler_never_exceeds_one():
    h = sample_hyperparameters(7, 3, 4000, 2, oversample=0.2, constrain=True).numpy()
    lam, mu = h[:, 0], h[:, 1]
    assert (lam + mu).max() <= 1.0 + 1e-6 and mu.min() >= 0
    free = sample_hyperparameters(7, 3, 4000, 2, oversample=0.2).numpy()
    np.testing.assert_array_equal(lam, free[:, 0])  # lambda unchanged, mu = its draw * (1 - lambda)
    np.testing.assert_allclose(mu, free[:, 1] * (1 - free[:, 0]), rtol=1e-6)
    assert (free.sum(1) > 1).mean() > 0.4  # independent sampling leaves the triangle often
    sa = sample_hyperparameters(7, 3, 500, 8, constrain=True).numpy()  # per class: [lambda_0..3, mu_0..3]
    assert (sa[:, :4] + sa[:, 4:]).max() <= 1.0 + 1e-6


# ---- identification ------------------------------------------------------------------------------------
def _grid_best_at_zero():
    grid = ident.make_grid("elastic", [0.0, 0.5, 1.0])
    df = pd.DataFrame({"pair_id": "p1", "lambda": grid[:, 0], "mu": grid[:, 1]})
    s = df["lambda"] + df["mu"]
    for k, name in enumerate(CLASSES):
        df[f"dice_{name}"] = 0.9 - 0.1 * s + 0.01 * k * df["mu"]  # every class best at (0, 0)
    df["mean_dice"] = df[[f"dice_{c}" for c in CLASSES]].mean(1)
    df["tre"] = 1.0 + np.abs(df["lambda"] - 1.0) + np.abs(df["mu"] - 0.5)  # TRE best at (1, 0.5)
    return df


def test_authors_identification_background_zero_and_zero_point_never_chosen():
    df = _grid_best_at_zero()
    paper = ident.choose_parameters(df, "elastic", CLASSES).iloc[0]
    assert (paper["lambda_lung"], paper["mu_lung"], paper["g_lambda"], paper["g_mu"]) == (0, 0, 0, 0)
    authors = ident.choose_parameters(df, "elastic", CLASSES, background="zero", exclude_zero=True).iloc[0]
    assert (authors["lambda_background"], authors["mu_background"]) == (0.0, 0.0)
    for c in CLASSES:
        assert authors[f"lambda_{c}"] + authors[f"mu_{c}"] > 0
    assert authors["g_lambda"] + authors["g_mu"] > 0
    tre = ident.choose_parameters(df, "elastic", CLASSES, background="zero", exclude_zero=True, objective="tre")
    assert (tre.iloc[0]["g_lambda"], tre.iloc[0]["g_mu"]) == (1.0, 0.5)
    assert tre.iloc[0]["lambda_lung"] == authors["lambda_lung"]  # tissues keep their class Dice
    two = pd.concat([df, df.assign(pair_id="p2")])
    per_set = ident.population_choice(two, "elastic", CLASSES, ["p1", "p2"], background="zero", exclude_zero=True)
    assert list(per_set["pair_id"]) == ["p1", "p2"] and per_set["lambda_background"].eq(0).all()
    with pytest.raises(ValueError, match="tre"):
        ident.choose_parameters(df.drop(columns="tre"), "elastic", CLASSES, objective="tre")


def test_authors_tre_is_sqrt_of_mean_distance():
    """The authors' eval_metrics.TRE returns sqrt(mean(distance)) (mm^0.5), not the mean distance."""
    d = np.array([1.0, 4.0])
    assert np.sqrt(np.mean(d)) == pytest.approx(1.5811, abs=1e-4) and np.mean(d) == 2.5


# ---- end to end ----------------------------------------------------------------------------------------
# two tiny trainings, a grid identification and inference (~60 s alone): the authors profile end to end
# in make test (issue 33), on its own pytest-xdist worker while other files run on the other
def test_authors_profile_end_to_end_and_stages_refuse_another_profile(tmp_path):
    import inference
    import parameter_identification
    from hypermorph_spatially_adaptive import artifacts as art
    from hypermorph_spatially_adaptive.trainer import main as train_main

    data = ["--dataset", "synthetic", "--image-size", "32", "32", "--num-pairs", "8",
            "--cache-dir", str(tmp_path / "cache")]
    common = data + TINY_ARCH + ["--profile", "authors", "--steps", "3", "--val-every", "0", "--log-every", "1"]
    runs = {p: str(tmp_path / p) for p in ("elastic_global", "elastic_sa")}
    for preset, out in runs.items():
        train_main(preset, common + ["--out", out])
    cfg = art.read_config(runs["elastic_global"])
    assert cfg["fidelity"] == AUTHORS.to_dict() and cfg["model"]["int_resolution"] == 1
    assert cfg["loss"]["reg_field"] == "svf" and "1 - lambda" in cfg["loss"]["hyp_sampling"]
    with pytest.raises(ValueError, match="--profile"):
        parameter_identification.main(["--run", runs["elastic_global"], "--profile", "paper", "--grid-steps", "3",
                                       "--out", str(tmp_path / "bad")])
    ident_dir = str(tmp_path / "ident")
    parameter_identification.main(["--run", runs["elastic_global"], "--grid-steps", "3", "--out", ident_dir,
                                   "--no-figure"])
    meta = json.loads(open(os.path.join(ident_dir, art.IDENTIFICATION_META)).read())
    grid = pd.read_csv(os.path.join(ident_dir, art.GRID_DICE))
    # the synthetic pairs carry keypoints, so 'auto' picks the -g baseline by TRE
    assert meta["fidelity"]["profile"] == "authors" and meta["fidelity"]["objective_used"] == "tre"
    assert grid["tre"].notna().all()
    assert (grid["lambda"] + grid["mu"]).max() <= 1.0 + 1e-9 and len(grid) == 6 * len(meta["pairs"])
    choice = pd.read_csv(os.path.join(ident_dir, art.IDENTIFIED_PARAMETERS))
    assert choice["lambda_background"].eq(0).all() and choice["mu_background"].eq(0).all()
    tissue = [c for c in choice if c.startswith("lambda_") and c != "lambda_background"]
    for c in tissue:
        assert ((choice[c] + choice[c.replace("lambda_", "mu_")]) > 0).all()
    with pytest.raises(ValueError, match="profile"):
        inference.main(["--out", str(tmp_path / "res_bad"), "--elastic-sa", runs["elastic_sa"], "--elastic-ident",
                        ident_dir, "--panels", "0", "--bootstrap", "100", "--profile", "paper"])
    # gradient identification records the profile too, so inference reads it beside the grid's
    grad_dir = str(tmp_path / "grad")
    parameter_identification.main(["--run", runs["elastic_global"], "--sa-run", runs["elastic_sa"], "--method",
                                   "gradient", "--steps", "2", "--out", grad_dir, "--no-figure"])
    grad_meta = json.loads(open(os.path.join(grad_dir, art.IDENTIFICATION_META)).read())
    assert grad_meta["fidelity"]["profile"] == "authors"
    res = str(tmp_path / "res")
    inference.main(["--out", res, "--elastic-sa", runs["elastic_sa"], "--elastic-ident", ident_dir, grad_dir,
                    "--panels", "0", "--bootstrap", "100"])
    per_pair = pd.read_csv(os.path.join(res, art.PER_PAIR_METRICS))
    assert {"elas-g", "elas-sas", "elas-sas@g", "elas-sas (gradient)"} <= set(per_pair["method"])
    assert json.loads(open(os.path.join(res, art.INFERENCE_META)).read())["profile"] == "authors"


# ---- the study under both profiles ---------------------------------------------------------------------
def test_study_units_of_the_authors_profile_keep_the_paper_units_valid():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import study

    assert study.unit_setting("paper") == "paper" and study.unit_setting("paper", "authors") == "paper-authors"
    assert study.split_setting("calibrated-authors") == ("calibrated", "authors")
    assert study.split_setting("calibrated") == ("calibrated", "paper")
    args = study.build_parser().parse_args(["--profiles", "paper", "authors"])
    paper_argv = study._pipeline_argv(args, "paper", 0, "o")
    assert "--profile" not in paper_argv  # the recorded paper units' command is unchanged
    authors_argv = study._pipeline_argv(args, "paper-authors", 0, "o")
    assert authors_argv[authors_argv.index("--profile") + 1] == "authors"
    assert [a for a in authors_argv if a not in ("--profile", "authors")] == paper_argv
    rng = np.random.default_rng(0)
    rows = []
    for setting, shift in (("paper", 0.0), ("paper-authors", -0.03)):
        for seed in (0, 1):
            for k in range(6):
                for method in ("initial", "elas-g", "elas-sas"):
                    rows.append({"setting": setting, "seed": seed, "pair_id": f"p{k}", "method": method,
                                 "protocol": "" if method == "initial" else "oracle",
                                 "mean_dice": 0.8 + 0.01 * k + shift + rng.normal(0, 1e-3), "hd95": 3.0,
                                 "tre": np.nan, "dense_epe": 0.5, "seconds": 0.01, "percent_neg_jac": 0.0,
                                 "sdlogj": 0.2})
    comp = study.compare(pd.DataFrame(rows), n_boot=200)
    cross = comp[comp["setting"] == "paper-authors - paper"]
    assert len(cross) > 0
    dice = cross[cross["metric"] == "mean_dice"]
    assert np.allclose(dice["mean_diff"], -0.03, atol=2e-3), dice


def test_crop_in_loss_zeroes_the_warped_image_where_the_fixed_is_empty_and_defaults_per_dataset():
    rng = np.random.default_rng(0)
    fixed = rng.uniform(0.2, 1, (1, 32, 32, 1)).astype(np.float32)
    fixed[:, :, :10] = 0.0  # outside the body / the padded field of view
    warped = rng.uniform(0.2, 1, (1, 32, 32, 1)).astype(np.float32)
    u, hyp, spec = tf.zeros((1, 32, 32, 2)), np.array([[0.3, 0.4]], np.float32), ParamSpec("elastic", False, 3)
    masked = tf.constant(np.where(fixed == 0, 0.0, warped).astype(np.float32))
    fixed, warped = tf.constant(fixed), tf.constant(warped)
    on = loss_terms(spec, fixed, warped, u, hyp, fidelity=Fidelity(crop_in_loss=True))
    by_hand = loss_terms(spec, fixed, masked, u, hyp)
    off = loss_terms(spec, fixed, warped, u, hyp)
    np.testing.assert_allclose(on["similarity"].numpy(), by_hand["similarity"].numpy(), rtol=1e-6)
    assert abs(float(on["similarity"][0]) - float(off["similarity"][0])) > 1e-3  # it changes the loss
    # the dataset decides the default under either profile; the flag overrides it
    for dataset, profile, flag, expected in (("nlst", "paper", [], True), ("l2r-lung", "authors", [], True),
                                             ("synthetic", "authors", [], False), ("acdc", "paper", [], False),
                                             ("nlst", "paper", ["--no-crop-in-loss"], False),
                                             ("synthetic", "paper", ["--crop-in-loss"], True)):
        args = build_parser("elastic_global").parse_args(["--dataset", dataset, "--profile", profile, *flag])
        assert resolve_fidelity(args).crop_in_loss is expected, (dataset, profile, flag)
        assert resolve_fidelity(args).crop_in_loss is expected  # idempotent
    with pytest.raises(ValueError, match="crop_in_loss"):
        Fidelity(crop_in_loss="yes")
