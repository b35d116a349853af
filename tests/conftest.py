"""Shared test setup: repo root on sys.path, shims before TensorFlow, quiet logs, seeds; the
session-wide ``--quick`` pipeline run that several test files read."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tf_compat  # noqa: E402,F401  (shims before TensorFlow: TF_USE_LEGACY_KERAS, getargspec)
from run_pipeline import QUICK  # noqa: E402

# The --quick pipeline with two test-only training options (a last option wins): one
# scaling-and-squaring step instead of 7 and no validation passes. Nearly all of its time is
# TensorFlow building and tracing graphs, and every traced function (training step, grid chunk,
# gradient identification, inference) carries the integration: 1 step keeps the integration and
# its rescale in every graph at about half the cost (7 squarings are checked in
# test_models_training).
QUICK_TRAIN_ARGS = "--int-steps 1 --val-every 0"

# The tiny architecture of the test models that train for a few steps: run_pipeline's --quick
# networks with the same single scaling-and-squaring step (importable as ``from conftest import TINY_ARCH``).
TINY_ARCH = [*QUICK["arch"], "--int-steps", "1"]


def _quick_argv(out, *extra) -> list:
    return ["--quick", "--out", str(out), "--cache-dir", str(os.path.join(out, "cache")),
            "--train-args", QUICK_TRAIN_ARGS, *extra]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Work units of ``pytest -n`` (pytest-xdist, ``--dist loadgroup`` in pytest.ini): every test that
    reads :func:`quick_run` in one group, so the session's quick pipeline is made once; every other
    test grouped with its file, so a module-scoped fixture is made once. Without xdist the marks
    do nothing. ``tryfirst``: xdist's worker reads the marks in its own hook of this name, which
    otherwise runs before this one; and pytest 9.2 no longer lets xdist 3.8 tag the test ids
    (pytest-xdist issue 1386), hence pytest 9.1.1 in requirements.txt
    (test_architecture.py::test_xdist_groups_reach_the_scheduler)."""
    for item in items:
        group = "quick_run" if "quick_run" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def quick_argv():
    """``quick_argv(out, *extra)``: the command line of the :func:`quick_run` pipeline (a rerun with
    it reuses the trained models)."""
    return _quick_argv


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """Output folder of one ``run_pipeline.py --quick`` run (four models, grid identification in
    both protocols, gradient identification, inference with refinement, Fig. 3 of one pair), made
    once per session; tests only read it (the rerun test of test_pipeline.py repeats stage 1 into
    it, which reuses every model)."""
    import run_pipeline

    out = tmp_path_factory.mktemp("quick")
    run_pipeline.main(_quick_argv(out, "--panels", "1"))  # Fig. 3 of one pair (a panel costs seconds of drawing)
    return out
