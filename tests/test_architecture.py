"""Layering (CONVENTIONS.md "Import floors"): the data side (``datasets``, ``eval_metrics``) never imports
TensorFlow, Keras, voxelmorph, neurite or the model package; the one atomic writer behaves; no private
name crosses a module; benchmarks import no script and spell no stage file name; the import graph of
our modules has no cycle and no edge back up the floors; imports inside functions are only of slow or
optional modules; the package docstring lists exactly its modules.

Dependencies point one way: scripts -> ``hypermorph_spatially_adaptive`` -> {``datasets``,
``regularizers``, ``eval_metrics``} -> ``tf_compat``. Only ``datasets.tfdata.make_tf_dataset`` imports
TensorFlow on the data side, inside the function.
"""
import ast
import os
import pkgutil
import re
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


# ------------------------------------------------------------------------------------------------
# the import graph of our modules: floors, cycles, lazy imports (CONVENTIONS.md "Import floors")
# ------------------------------------------------------------------------------------------------
#: imported inside a function only where they are needed: slow to import (TensorFlow and its stack,
#: matplotlib, pandas; scipy 0.15-0.9 s per submodule, nibabel 0.13 s: a script's --help imports none
#: of them) or optional (antspyx, a benchmark peer)
SLOW = ("tensorflow", "keras", "tf_keras", "voxelmorph", "neurite", "matplotlib", "pandas", "scipy", "nibabel",
        "ants")


def _our_modules():
    """``{module name: path}`` of every module of ours: top-level modules, the two packages, benchmarks."""
    mods = {f[:-3]: os.path.join(ROOT, f) for f in sorted(os.listdir(ROOT)) if f.endswith(".py")}
    for pkg in ("hypermorph_spatially_adaptive", "datasets"):
        for f in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if f.endswith(".py"):
                mods[pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"] = os.path.join(ROOT, pkg, f)
    bench = os.path.join(ROOT, "benchmarks")
    for f in sorted(os.listdir(bench)):
        if f.endswith(".py"):
            assert f[:-3] not in mods, f"benchmarks/{f} shadows a module of the same name"
            mods[f[:-3]] = os.path.join(bench, f)  # run with benchmarks/ on sys.path
    return mods


MODULES = _our_modules()


def _imported(mod, node):
    """Absolute names of what an import statement of ``mod`` imports (``from pkg import sub`` -> ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = mod if MODULES[mod].endswith("__init__.py") else mod.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = pkg + ("." + base if base else "")
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports(mod):
    """``(module-level, function-local, calls import_voxelmorph at module level)``: lists of
    ``(line, imported names)``."""
    with open(MODULES[mod]) as fh:
        tree = ast.parse(fh.read(), filename=MODULES[mod])
    top, local, tf_call = [], [], False

    def visit(node, in_function):
        nonlocal tf_call
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not getattr(child, "module", None) == "__future__":
                (local if inside else top).append((child.lineno, _imported(mod, child)))
            if not inside and isinstance(child, ast.Call) and getattr(child.func, "id", "") == "import_voxelmorph":
                tf_call = True
            visit(child, inside)

    visit(tree, False)
    return top, local, tf_call


IMPORTS = {m: _imports(m) for m in MODULES}


def _ours(name):
    """The module of ours ``name`` refers to (a module or a name inside one), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _slow_modules():
    """External roots in :data:`SLOW` and our modules that import one at module level (transitively, the
    parent package included) or call ``tf_compat.import_voxelmorph`` there."""
    slow = {m for m, (_, _, tf_call) in IMPORTS.items() if tf_call}
    changed = True
    while changed:
        changed = False
        for m, (top, _, _) in IMPORTS.items():
            parent = m.rpartition(".")[0]
            deps = [n for _, names in top for n in names] + ([parent] if parent in MODULES else [])
            if m not in slow and any(n.split(".")[0] in SLOW or _ours(n) in slow for n in deps):
                slow.add(m)
                changed = True
    return slow


SLOW_OURS = _slow_modules()


def _is_slow(name):
    return name.split(".")[0] in SLOW or _ours(name) in SLOW_OURS


def test_function_local_imports_are_only_of_slow_modules():
    """Light imports (standard library, numpy, our light modules) sit at the top of the module; an
    import inside a function is kept for slow or optional modules (:data:`SLOW`, or ours importing
    one at module level). The package, the top-level modules and the benchmarks."""
    bad = []
    for mod, (_, local, _) in IMPORTS.items():
        if mod.split(".")[0] == "datasets":  # keeps even numpy-level work lazy: `import datasets` does no work
            continue
        bad += [f"{os.path.relpath(MODULES[mod], ROOT)}:{line} {', '.join(n for n in names if not _is_slow(n))}"
                for line, names in local if not all(_is_slow(n) for n in names)]
    assert not bad, "move these imports to the top of the module:\n" + "\n".join(bad)


def test_the_slow_set_is_what_the_imports_say():
    assert {"hypermorph_spatially_adaptive.models", "hypermorph_spatially_adaptive.tf_ops", "regularizers",
            "eval_metrics", "hypermorph_spatially_adaptive.tables"} <= SLOW_OURS
    light = {"hypermorph_spatially_adaptive", "hypermorph_spatially_adaptive.artifacts", "tf_compat", "datasets",
             "hypermorph_spatially_adaptive.params", "hypermorph_spatially_adaptive.configs", "inference",
             "hypermorph_spatially_adaptive.cli", "hypermorph_spatially_adaptive.run_folder", "run_pipeline",
             "hypermorph_spatially_adaptive.forward", "hypermorph_spatially_adaptive.trainer", "register",
             "parameter_identification"}
    assert not light & SLOW_OURS, light & SLOW_OURS


def test_light_modules_load_none_of_the_slow_ones():
    """What the source says is light is light when imported (no TensorFlow, pandas, scipy, ...)."""
    light = sorted(m for m in MODULES if m not in SLOW_OURS and os.path.dirname(MODULES[m]) != os.path.join(
        ROOT, "benchmarks") and m not in ("entry_points",))
    code = ("import importlib, sys\n"
            f"for name in {light!r}:\n"
            "    importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SLOW!r}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def _graph():
    """``{module: {modules of ours it imports, at module level or inside a function}}``."""
    graph = {}
    for mod, (top, local, _) in IMPORTS.items():
        graph[mod] = {_ours(n) for _, names in top + local for n in names if _ours(n) not in (None, mod)}
    return graph


def test_no_import_cycle_among_our_modules():
    """Not even through an import inside a function (a cycle there only hides the layering problem)."""
    graph, cycles = _graph(), []

    def walk(node, path, done):
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                walk(nxt, path + [nxt], done)
        done.add(node)

    done = set()
    for mod in sorted(graph):
        if mod not in done:
            walk(mod, [mod], done)
    assert not cycles, cycles


def _floor(mod):
    """CONVENTIONS.md "Import floors": 1 scripts and benchmarks, 2 the package, 3 datasets, regularizers,
    eval_metrics, 4 tf_compat."""
    if mod == "tf_compat":
        return 4
    if mod.split(".")[0] in ("datasets", "regularizers", "eval_metrics"):
        return 3
    if mod.split(".")[0] == "hypermorph_spatially_adaptive":
        return 2
    return 1


def test_no_import_goes_back_up_the_floors():
    """Every import (module level or inside a function) points to the same floor or a lower one;
    on floor 1 a script is imported only by run_pipeline.py (it runs their ``main``)."""
    bad = []
    for mod, deps in _graph().items():
        for dep in sorted(deps):
            if _floor(dep) < _floor(mod):
                bad.append(f"{mod} -> {dep} (floor {_floor(mod)} -> {_floor(dep)})")
            elif _floor(dep) == 1 and dep in SCRIPTS and mod != "run_pipeline":
                bad.append(f"{mod} -> {dep} (a script)")
    assert not bad, bad


def test_the_package_docstring_lists_exactly_its_modules():
    import hypermorph_spatially_adaptive as pkg

    modules = {m.name for m in pkgutil.iter_modules([os.path.join(ROOT, "hypermorph_spatially_adaptive")])}
    listed = re.findall(r"^- :mod:`\.(\w+)`", pkg.__doc__, flags=re.M)
    assert len(modules) >= 25 and len(listed) == len(set(listed)), "a module is listed twice"
    assert set(listed) == modules, {"not listed": modules - set(listed), "listed, no such module": set(listed) - modules}


def test_xdist_groups_reach_the_scheduler(request):
    """Under ``pytest -n`` with ``--dist loadgroup`` (pytest.ini) xdist schedules by the ``@group``
    suffix of the test id; if it is missing (pytest 9.2 with xdist 3.8, or conftest's marks added
    after xdist's hook) every group is split across workers and the session's quick pipeline is
    built once per worker (~2 min of make test), with nothing failing. Checked on the worker."""
    if not getattr(request.config, "workerinput", None) or not request.config.getvalue("loadgroup"):
        pytest.skip("not an xdist worker under --dist loadgroup")
    assert request.node.nodeid.endswith("@tests/test_architecture.py"), request.node.nodeid
