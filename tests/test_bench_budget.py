"""benchmarks/bench_budget.py: the network-input layouts and the per-tissue sweep, with a fake network
whose field is known in closed form (so the selected inputs and their EPE are known)."""
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_budget  # noqa: E402

K = 3  # background + 2 tissues
TRUE = {1: (0.4, 0.6), 2: (0.8, 0.2)}


class FieldOfInputs:
    """A fake SA elastic network: inside class c the displacement is ``(lambda_c, mu_c)`` voxels."""

    def chunks(self, moving, fixed, hyp, fixed_seg):
        seg = np.asarray(fixed_seg)
        disp = np.zeros((len(hyp), *seg.shape, 2), np.float32)
        for c in range(K):
            disp[:, seg == c] = np.stack([hyp[:, c], hyp[:, K + c]], 1)[:, None]
        yield 0, None, disp


def _pair():
    seg = np.zeros((8, 8), np.int32)
    seg[:, :4], seg[:, 4:6] = 1, 2
    truth = np.zeros((8, 8, 2), np.float32)
    for c, v in TRUE.items():
        truth[seg == c] = v
    img = np.zeros((8, 8, 1), np.float32)
    return SimpleNamespace(moving=img, fixed=img, fixed_seg=seg, moving_seg=seg, spacing=(1.0, 1.0),
                           extras={"disp_true": truth})


def test_global_inputs_repeat_each_point_in_every_class():
    grid = np.array([[0.2, 0.4], [1.0, 0.0]])
    np.testing.assert_array_equal(bench_budget._global_hyp(grid, False, K), grid.astype(np.float32))
    sa = bench_budget._global_hyp(grid, True, K)
    np.testing.assert_allclose(sa[0], [0.2, 0.2, 0.2, 0.4, 0.4, 0.4], rtol=1e-7)
    np.testing.assert_array_equal(sa[1], [1, 1, 1, 0, 0, 0])


def test_sweep_finds_each_tissues_true_inputs():
    """Every tissue's true (lambda, mu) is on the 6-value grid, so one sweep reaches EPE 0, which no
    single global point can (the tissues want different values)."""
    from hypermorph_spatially_adaptive.grid_identification import grid_values, make_grid

    grid = make_grid("elastic", grid_values(6))
    pair, reg = _pair(), FieldOfInputs()
    glob = bench_budget._score(reg, [pair], bench_budget._global_hyp(grid, True, K), 2)[0, :, 0]
    assert glob.min() > 0.1
    best, scores = bench_budget._sweep(reg, [pair], bench_budget._global_hyp(grid, True, K)[int(np.argmin(glob))],
                                       grid, K, 2)
    for c, (lam, mu) in TRUE.items():
        assert best[c] == pytest.approx(lam) and best[K + c] == pytest.approx(mu)
    assert bench_budget._score(reg, [pair], best[None], 2)[0, 0, 0] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(scores, bench_budget._score(reg, [pair], best[None], 2)[:, 0])  # the returned scores


@pytest.mark.parametrize("argv, match", [(["--rungs", "300", "200"], "increasing"),
                                         (["--runs", "elastic_sa"], "PRESET:LR"),
                                         (["--reference", "nolabel"], "LABEL=MM")])
def test_bad_options_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit, match=match):
        bench_budget._check_args(bench_budget.build_parser().parse_args(argv))
