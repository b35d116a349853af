"""Import floors and the typed hand-offs between stages (run folder -> identification -> inference)."""
import os
import subprocess
import sys

import pytest

from hypermorph_spatially_adaptive import artifacts as art
from conftest import TINY_ARCH  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = [*TINY_ARCH, "--hyp-units", "16"]  # a last option wins


def _fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter at the repo root; its stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_params_imports_without_voxelmorph_neurite_or_tensorflow():
    loaded = _fresh("import sys, hypermorph_spatially_adaptive.params, hypermorph_spatially_adaptive.artifacts; "
                    "print(sorted(m for m in ('voxelmorph', 'neurite', 'tensorflow') if m in sys.modules))")
    assert loaded == "[]"


def test_regularizers_is_below_the_package_and_a_model_builds_after_it():
    """``regularizers`` applies the shim without importing the package (no upward arrow); with
    TensorFlow already loaded by it, a voxelmorph model built through the package is Keras 2."""
    line = _fresh("import os, sys, regularizers\n"
                  "print('hypermorph_spatially_adaptive' in sys.modules, 'tensorflow' in sys.modules, "
                  "os.environ.get('TF_USE_LEGACY_KERAS'), end=' ')\n"
                  "from hypermorph_spatially_adaptive.models import ModelConfig, build_model\n"
                  "m = build_model(ModelConfig((16, 16), 'elastic', True, 2, enc_features=(4, 4, 4, 4), "
                  "dec_features=(4,) * 7, hyp_layers=1, hyp_units=4))\n"
                  "print(type(m).__module__.split('.')[0], m.inputs[2].shape[-1])")
    assert line == "False True 1 tf_keras 6"


def test_read_run_and_read_identification_round_trip(tmp_path):
    import pandas as pd

    import parameter_identification
    from hypermorph_spatially_adaptive.trainer import main as train_main

    run = str(tmp_path / "g")
    data = ["--dataset", "synthetic", "--image-size", "32", "32", "--num-pairs", "6",
            "--cache-dir", str(tmp_path / "cache")]
    train_main("diffusion_global", data + ARCH + ["--out", run, "--steps", "2", "--val-every", "0",
                                                  "--log-every", "1"])
    info = art.read_run(run, expect_regularizer="diffusion", expect_sa=False)
    assert (info.preset, info.regularizer, info.spatially_adaptive, info.finished) == \
        ("diffusion_global", "diffusion", False, True)
    assert info.weights == os.path.join(run, art.WEIGHTS) and os.path.isfile(info.weights)
    assert info.class_names and info.num_classes == len(info.class_names)
    assert info.spec.num_params == 1 and info.data["name"] == "synthetic"
    assert os.path.isfile(os.path.join(run, art.TRAIN_LOG))
    with pytest.raises(ValueError, match="spatially adaptive"):
        art.read_run(run, expect_sa=True)
    with pytest.raises(ValueError, match="elastic"):
        art.read_run(run, expect_regularizer="elastic")

    out = parameter_identification.main(["--run", run, "--grid-steps", "2", "--split", "val", "--no-figure"])
    assert out == os.path.join(run, art.IDENTIFICATION_DIRS["oracle"])
    sa_cols = art.sa_columns("diffusion", info.class_names)
    ident = art.read_identification(out, "diffusion", sa_cols)
    assert (ident.method, ident.protocol, ident.objective, ident.suffix) == ("grid", "oracle", "dice", "")
    assert ident.split == "val" and ident.regularizer == "diffusion"
    assert ident.global_run == os.path.abspath(run) and ident.data == info.data
    assert ident.class_names == info.class_names
    assert ident.pair_ids == art.load_dataset(info.config).split_ids("val")
    table = ident.table
    assert list(table.columns[: 1 + len(sa_cols)]) == [art.REGULARIZER, *sa_cols]
    assert art.global_columns("diffusion") == ["g_lambda"] and "g_lambda" in table and art.G_MEAN_DICE in table
    assert art.global_columns("elastic") == ["g_lambda", "g_mu"]
    with pytest.raises(ValueError, match="elastic"):
        art.read_identification(out, "elastic")
    with pytest.raises(ValueError, match="mu_background"):
        art.read_identification(out, None, ["mu_background"])
    pd.read_csv(os.path.join(out, art.GRID_DICE))  # the grid table is there too
    with pytest.raises(FileNotFoundError, match=art.IDENTIFIED_PARAMETERS):
        art.read_identification(str(tmp_path))
