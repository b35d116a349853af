"""Layering: the data side (``datasets``, ``eval_metrics``) never imports TensorFlow, Keras,
voxelmorph, neurite or the model package; and the one atomic writer behaves.

Dependencies point one way: scripts -> ``hypermorph_spatially_adaptive`` -> {``datasets``,
``regularizers``, ``eval_metrics``}. Only ``datasets.tfdata.make_tf_dataset`` imports TensorFlow,
inside the function.
"""
import ast
import os
import pkgutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = ("tensorflow", "keras", "tf_keras", "voxelmorph", "neurite", "hypermorph_spatially_adaptive")


def data_side_modules():
    names = ["datasets"]
    names += [f"datasets.{m.name}" for m in pkgutil.iter_modules([os.path.join(ROOT, "datasets")])]
    return names + ["eval_metrics"]


def data_side_files():
    folder = os.path.join(ROOT, "datasets")
    files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")]
    return files + [os.path.join(ROOT, "eval_metrics.py")]


def test_data_side_modules_listed():
    mods = data_side_modules()
    for expected in ("datasets.base", "datasets.phantoms", "datasets.tfdata", "datasets.atomic", "datasets.cli"):
        assert expected in mods


def test_importing_the_data_side_loads_no_model_code():
    mods = data_side_modules()
    code = ("import importlib, sys\n"
            f"for name in {mods!r}:\n"
            "    importlib.import_module(name)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
            "print(repr(bad))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def _module_level_imports(tree):
    """Top-level names of the modules imported outside any function body (class bodies and
    ``if``/``try`` blocks at module level count as module level)."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], child.lineno))
            visit(child)

    visit(tree)
    return found


@pytest.mark.parametrize("path", data_side_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_module_level_import_of_model_code(path):
    with open(path) as fh:
        tree = ast.parse(fh.read(), filename=path)
    bad = [(name, line) for name, line in _module_level_imports(tree) if name in FORBIDDEN]
    assert not bad, f"{os.path.relpath(path, ROOT)}: module-level import of {bad}"


def test_model_package_is_imported_nowhere_on_the_data_side():
    """Not even lazily inside a function: the arrow would point up."""
    for path in data_side_files():
        with open(path) as fh:
            tree = ast.parse(fh.read(), filename=path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "hypermorph_spatially_adaptive" for n in names), \
                f"{os.path.relpath(path, ROOT)}:{node.lineno} imports the model package"


# ------------------------------------------------------------------------------------------------
# the one atomic writer
# ------------------------------------------------------------------------------------------------
def _no_temp_files(folder, expected):
    assert sorted(os.listdir(folder)) == sorted(expected)


def test_atomic_write_bytes_text_and_writer_get_0644_under_umask_022(tmp_path):
    from datasets.atomic import atomic_write

    old = os.umask(0o022)
    try:
        assert atomic_write(str(tmp_path / "a.bin"), b"\x00\x01") == str(tmp_path / "a.bin")
        atomic_write(str(tmp_path / "b.txt"), "héllo\n")

        def writer(tmp):
            with open(tmp, "w") as fh:
                fh.write("from a writer")

        atomic_write(str(tmp_path / "sub" / "c.csv"), writer)  # folder created
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "sub" / "c.csv").read_text() == "from a writer"
    for rel in ("a.bin", "b.txt", "sub/c.csv"):
        assert (tmp_path / rel).stat().st_mode & 0o777 == 0o644, rel
    _no_temp_files(tmp_path, ["a.bin", "b.txt", "sub"])
    _no_temp_files(tmp_path / "sub", ["c.csv"])


def test_atomic_write_keeps_old_content_when_the_writer_raises(tmp_path):
    from datasets.atomic import atomic_write

    target = tmp_path / "table.csv"
    target.write_text("old")
    seen = []

    def broken(tmp):
        seen.append(tmp)
        assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".csv")
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(target), broken)
    assert target.read_text() == "old"
    assert seen and not os.path.exists(seen[0])
    _no_temp_files(tmp_path, ["table.csv"])
    with pytest.raises(TypeError, match="bytes, str or a writer"):
        atomic_write(str(target), 3.5)
    assert target.read_text() == "old"
    _no_temp_files(tmp_path, ["table.csv"])


def test_atomic_write_replaces_and_keeps_double_extension(tmp_path):
    from datasets.atomic import atomic_write

    target = tmp_path / "img.nii.gz"
    target.write_bytes(b"old")
    suffixes = []

    def writer(tmp):
        suffixes.append(tmp)
        with open(tmp, "wb") as fh:
            fh.write(b"new")

    atomic_write(str(target), writer)
    assert target.read_bytes() == b"new" and suffixes[0].endswith(".nii.gz")
    _no_temp_files(tmp_path, ["img.nii.gz"])


def test_atomic_write_writes_a_dataframe_as_csv_without_index(tmp_path):
    import pandas as pd

    from datasets.atomic import atomic_write

    df = pd.DataFrame({"pair_id": ["a", "b"], "dice": [0.5, 0.75]}, index=[7, 9])
    target = tmp_path / "t.csv"
    atomic_write(str(target), df)
    assert target.read_text().splitlines() == ["pair_id,dice", "a,0.5", "b,0.75"]
    _no_temp_files(tmp_path, ["t.csv"])


# ------------------------------------------------------------------------------------------------
# walls between modules (issue 38): private names, scripts, stage file names
# ------------------------------------------------------------------------------------------------
#: the command-line scripts at the repository root (CONVENTIONS.md "Import floors", floor 1)
SCRIPTS = ("run_pipeline", "inference", "register", "parameter_identification", "train_hypermorph_elastic_global",
           "train_hypermorph_elastic_sa", "train_hypermorph_diffusion_global", "train_hypermorph_diffusion_sa")


def _code_files(*folders, top_level=False):
    files = [os.path.join(ROOT, f) for f in sorted(os.listdir(ROOT)) if f.endswith(".py")] if top_level else []
    for folder in folders:
        base = os.path.join(ROOT, folder)
        files += [os.path.join(base, f) for f in sorted(os.listdir(base)) if f.endswith(".py")]
    return files


def _trees(files):
    for path in files:
        with open(path) as fh:
            yield os.path.relpath(path, ROOT), ast.parse(fh.read(), filename=path)


def test_no_private_name_is_imported_from_another_module():
    """A name with a leading underscore belongs to its module: make it public or move the caller."""
    bad = []
    for rel, tree in _trees(_code_files("hypermorph_spatially_adaptive", "datasets", "benchmarks", top_level=True)):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                bad += [f"{rel}:{node.lineno} {node.module or '.'}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_benchmarks_import_no_script():
    bad = []
    for rel, tree in _trees(_code_files("benchmarks")):
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            bad += [f"{rel}:{node.lineno} {n}" for n in names if n.split(".")[0] in SCRIPTS]
    assert not bad, bad


def test_benchmarks_spell_no_stage_file_name():
    """Stage file names live in artifacts.py (CONVENTIONS.md "Stage hand-offs")."""
    from hypermorph_spatially_adaptive import artifacts as art

    names = {v for k, v in vars(art).items() if k.isupper() and isinstance(v, str) and "." in v}
    assert {"config.json", "identified_parameters.csv", "per_pair_metrics.csv"} <= names
    bad = []
    for rel, tree in _trees(_code_files("benchmarks")):
        bad += [f"{rel}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]
    assert not bad, bad


def test_the_package_docstring_lists_every_module():
    import hypermorph_spatially_adaptive as pkg

    modules = [m.name for m in pkgutil.iter_modules([os.path.join(ROOT, "hypermorph_spatially_adaptive")])]
    missing = [m for m in modules if f":mod:`.{m}`" not in pkg.__doc__]
    assert len(modules) >= 25 and not missing, missing
