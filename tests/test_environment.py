"""The pip and conda routes pin the same stack, and the compatibility shim does its job."""
import inspect
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("-").strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.\-]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_requirements_and_environment_yml_agree():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pip = _pins(f)
    with open(os.path.join(ROOT, "environment.yml")) as f:
        conda = _pins(f)
    assert pip, "no pins found in requirements.txt"
    assert pip == conda
    for pkg in ("tensorflow", "tf-keras", "voxelmorph", "neurite", "numpy", "nibabel", "scipy", "pandas", "matplotlib"):
        assert pkg in pip, pkg
    assert pip["voxelmorph"].startswith("0.2") and pip["neurite"].startswith("0.2")  # 0.3.x is PyTorch-only


def test_installed_versions_match_pins():
    import importlib.metadata as md

    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = _pins(f)
    for pkg, ver in pins.items():
        assert md.version(pkg) == ver, f"{pkg}: installed {md.version(pkg)}, pinned {ver}"


def test_shim_makes_voxelmorph_importable_with_keras2():
    from tf_compat import import_voxelmorph

    tf, vxm, ne = import_voxelmorph()
    assert hasattr(inspect, "getargspec")
    assert os.environ.get("TF_USE_LEGACY_KERAS") == "1"
    assert "tf_keras" in tf.keras.Model.__module__ or tf.__version__ < "2.16", tf.keras.Model.__module__
    assert hasattr(vxm.networks, "HyperVxmDense")
