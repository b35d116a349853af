"""The files the stages hand over, by name, and typed readers for them.

Every stage writes and reads its neighbours' files through the names below instead of spelling
them. Imports neither TensorFlow nor voxelmorph (pandas only inside the readers that need it).

Training run folder (``train_hypermorph_*.py``)::

    config.json        architecture, preset, loss/data/training options, seed, versions, command
    weights.h5         final weights
    checkpoints/       periodic tf.train checkpoints (``checkpoints/latest`` names the newest)
    train_log.csv      step, losses, validation loss, seconds per step
    tensorboard/       TensorBoard scalars

Identification folder (``parameter_identification.py``; default ``<run>/identification``,
``identification_population`` or ``identification_gradient[_epe]``)::

    identified_parameters.csv  one row per pair: pair_id, regularizer, the SA model's
                               hyperparameters (ParamSpec.names), their Dice, the global
                               baseline g_lambda[, g_mu], g_mean_dice
    identification.json        method, protocol, split, global run, data options, timing, ...
    grid_dice.csv              grid method: the whole grid per pair
    objective_trace.csv        gradient method: objective per step and pair
    fig2_parameters.png        identified parameters per tissue

Results folder (``inference.py``): per_pair_metrics.csv, table1.csv, table1.md, comparison.csv,
inference.json.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import datasets

from .folders import STAGE_MARKER  # noqa: F401  (every stage output folder's completion marker)
from .params import ParamSpec

# ---- training run folder ----------------------------------------------------------------------
CONFIG = "config.json"
WEIGHTS = "weights.h5"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.csv"
TENSORBOARD = "tensorboard"

#: marker written into every run's config.json (``"format"``); a folder is a run folder only if its
#: config.json is a JSON object with this marker (or, for runs made before it, ``preset`` + ``model``)
RUN_FORMAT = "hypermorph-run/1"

# ---- identification folder --------------------------------------------------------------------
IDENTIFIED_PARAMETERS = "identified_parameters.csv"
IDENTIFICATION_META = "identification.json"
GRID_DICE = "grid_dice.csv"
OBJECTIVE_TRACE = "objective_trace.csv"
FIG2 = "fig2_parameters.png"
#: default identification folder (inside the global run, or per regularizer in run_pipeline's --out)
IDENTIFICATION_DIRS = {"oracle": "identification", "population": "identification_population",
                       "gradient": "identification_gradient"}

#: columns of identified_parameters.csv besides the SA hyperparameters
PAIR_ID = "pair_id"
REGULARIZER = "regularizer"
G_PREFIX = "g_"
G_MEAN_DICE = "g_mean_dice"

# ---- results folder (inference.py) ------------------------------------------------------------
PER_PAIR_METRICS = "per_pair_metrics.csv"
TABLE1_CSV = "table1.csv"
TABLE1_MD = "table1.md"
COMPARISON = "comparison.csv"
INFERENCE_META = "inference.json"
STAGE_TIMES = "stage_times.csv"  # run_pipeline.py: wall time per stage, in its --out folder


#: file hashes of this process (:func:`file_sha256`: the weights check of :func:`read_run`, provenance.py)
_FILE_CACHE: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 (hex) of the bytes of ``path`` (cached by path, size and mtime)."""
    path = os.path.abspath(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _FILE_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_CACHE[key] = h.hexdigest()
    return _FILE_CACHE[key]


def short(h: Optional[str]) -> str:
    """The first 12 hex digits of a sha256 for messages (``none`` if missing)."""
    return "none" if not h else h[:12]


def global_columns(regularizer: str) -> List[str]:
    """The -g baseline's columns: ``['g_lambda', 'g_mu']`` (elastic) or ``['g_lambda']``."""
    return [G_PREFIX + n for n in ParamSpec(regularizer, False, 1).names()]


def sa_columns(regularizer: str, class_names: Sequence[str]) -> List[str]:
    """The SA model's hyperparameter columns (``lambda_background`` ... ``mu_<last class>``)."""
    return ParamSpec(regularizer, True, len(class_names)).names(class_names)


def run_config_problem(config: object, presets=None, need_model: bool = True) -> Optional[str]:
    """Why ``config`` (parsed config.json) is not a run config of this code, or ``None`` if it is:
    a JSON object whose ``format`` is :data:`RUN_FORMAT` (or, before the marker, that has none),
    with a ``preset`` among ``presets`` (if given) and (``need_model``) a ``model`` object naming
    ``regularizer`` and ``spatially_adaptive``."""
    if not isinstance(config, dict):
        return f"a JSON {type(config).__name__}, not an object"
    fmt = config.get("format")
    if fmt is not None and fmt != RUN_FORMAT:
        return f"format {fmt!r}, expected {RUN_FORMAT!r}"
    if presets is not None and config.get("preset") not in presets:
        return f"preset {config.get('preset')!r} is none of {sorted(presets)}"
    model = config.get("model")
    if need_model and not (isinstance(model, dict) and {"regularizer", "spatially_adaptive"} <= set(model)):
        return "no model object with regularizer and spatially_adaptive"
    return None


def read_config(run_dir: str) -> Dict:
    """``<run>/config.json`` as a dict; a clear error if it is missing or unreadable."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no run config; is {run_dir!r} a training run folder?")
    with open(path) as f:
        try:
            config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable run config ({e})") from e
    problem = run_config_problem(config, need_model=False)
    if problem:
        raise ValueError(f"{path}: not a run config of the training scripts ({problem})")
    return config


def run_state(run_dir: str, argv: Sequence[str]) -> str:
    """State of a training run folder for the training command ``argv`` (the script's arguments):
    ``"none"`` (no run), ``"finished"`` / ``"unfinished"`` (a run whose latest command,
    ``--resume``/``--overwrite`` aside, equals ``argv``) or ``"changed"`` (a run made with another
    command). The reuse rule of ``run_pipeline.py`` and ``benchmarks/smooth_maps.py``."""
    if not os.path.isfile(os.path.join(run_dir, CONFIG)):
        return "none"
    cfg = read_config(run_dir)
    command = (cfg.get("resumed") or [cfg])[-1].get("command", [None])
    if [a for a in command[1:] if a not in ("--resume", "--overwrite")] != list(argv):
        return "changed"
    done = bool(cfg.get("finished")) and os.path.isfile(os.path.join(run_dir, WEIGHTS))
    return "finished" if done else "unfinished"


def _kind(spatially_adaptive: bool) -> str:
    return "spatially adaptive" if spatially_adaptive else "global"


@dataclass(frozen=True)
class RunInfo:
    """A training run folder, read without building the model."""

    folder: str
    config: Dict = field(repr=False)
    preset: str
    regularizer: str
    spatially_adaptive: bool
    num_classes: int
    class_names: List[str]
    weights: str            # path of weights.h5 (may not exist yet)
    finished: bool          # training finished and weights.h5 present

    @property
    def spec(self) -> ParamSpec:
        return ParamSpec.from_model_config(self.config["model"])

    @property
    def data(self) -> Dict:
        return self.config["data"]

    @property
    def kind(self) -> str:
        return _kind(self.spatially_adaptive)


def _finish_command(folder: str, config: Dict) -> str:
    """The command that finishes a run: its latest training command with ``--resume``."""
    command = list((config.get("resumed") or [config])[-1].get("command") or config.get("command") or [])
    if not command:
        return f"the run's training script with --out {folder} --resume"

    command = [str(a) for a in command if a not in ("--resume", "--overwrite")] + ["--resume"]
    return "python " + shlex.join(command)


def unusable_run(folder: str, config: Dict) -> Optional[str]:
    """Why a later stage must not use the run in ``folder`` (config ``config``), or ``None``.

    Unusable: ``finished`` recorded false (training, or its latest ``--resume``, did not reach
    the end: its ``weights.h5``, if any, is from an earlier step than its checkpoints), no
    ``weights.h5``, or a ``weights.h5`` whose sha256 is not the one training recorded at its end
    (``provenance.weights_sha256``). A config without ``finished`` (a hand-made run folder) is
    judged by ``weights.h5`` alone.
    """
    weights = os.path.join(folder, WEIGHTS)
    where = os.path.join(folder, CONFIG)
    if config.get("finished") is False:
        steps = (config.get("training") or {}).get("steps")
        latest = os.path.join(folder, CHECKPOINTS, "latest")
        at = ""
        if os.path.isfile(latest):
            with open(latest) as fh:
                at = f"; its latest checkpoint is {fh.read().strip()}"
        stale = f", and {WEIGHTS} is from an earlier session" if os.path.isfile(weights) else ""
        return (f"{folder}: training is unfinished ({where} records finished: false, target {steps} steps{at}"
                f"{stale}); finish it first: {_finish_command(folder, config)}")
    if not os.path.isfile(weights):
        return f"{weights}: no final weights (training unfinished?); finish it first: {_finish_command(folder, config)}"
    recorded = (config.get("provenance") or {}).get("weights_sha256")
    if config.get("finished") and recorded:
        now = file_sha256(weights)
        if now != recorded:
            latest = os.path.join(folder, CHECKPOINTS, "latest")
            name = open(latest).read().strip() if os.path.isfile(latest) else ""
            ckpt = os.path.join(folder, CHECKPOINTS, name)
            if name and os.path.isfile(os.path.join(ckpt, "ckpt.index")):
                hint = (f"checkpoint {ckpt} (step {name.rsplit('_', 1)[-1].lstrip('0') or 0}) is intact: delete "
                        f"{weights} and rerun the training command with --resume to rewrite it from that checkpoint: "
                        f"{_finish_command(folder, config)}")
            else:
                hint = "no checkpoint can rewrite it: retrain the run"
            return (f"{weights} (sha256 {short(now)}) is not the file training finished with (sha256 {short(recorded)} "
                    f"in {where}): it was replaced, truncated or rewritten by an interrupted session; {hint}")
    return None


def read_run(folder: str, expect_regularizer: Optional[str] = None, expect_sa: Optional[bool] = None,
             require_finished: bool = True) -> RunInfo:
    """Read a run folder's config; ``expect_*`` make a mismatched folder fail naming the mismatch.

    ``require_finished`` (the default, for every stage that uses the run's weights) refuses an
    unusable run (:func:`unusable_run`: unfinished, mid-resume, weights missing or replaced) with
    the command that finishes it; ``False`` only reads (e.g. to report the run's state).
    """
    config = read_config(folder)
    problem = run_config_problem(config)
    if problem:
        raise ValueError(f"{os.path.join(folder, CONFIG)}: not a run config of the training scripts ({problem})")
    model = config["model"]
    sa = bool(model["spatially_adaptive"])
    if expect_regularizer is not None and model["regularizer"] != expect_regularizer:
        raise ValueError(f"{folder}: run uses the {model['regularizer']} regularizer, expected {expect_regularizer}")
    if expect_sa is not None and sa != expect_sa:
        raise ValueError(f"{folder}: run is a {_kind(sa)} model, expected a {_kind(expect_sa)} one")
    names = config.get("class_names")
    if isinstance(names, list) and names and int(model["num_classes"]) != len(names):
        raise ValueError(f"{os.path.join(folder, CONFIG)}: model num_classes {model['num_classes']} but class_names lists "
                         f"{len(names)} ({', '.join(map(str, names))}); the config was edited after training: restore "
                         "it (the weights were trained for the recorded classes)")
    weights = os.path.join(folder, WEIGHTS)
    if require_finished:
        problem = unusable_run(folder, config)
        if problem:
            raise (ValueError if os.path.isfile(weights) or config.get("finished") is False else FileNotFoundError)(problem)
    return RunInfo(folder=folder, config=config, preset=config.get("preset", ""), regularizer=model["regularizer"],
                   spatially_adaptive=sa, num_classes=int(model["num_classes"]),
                   class_names=list(config.get("class_names", [])), weights=weights,
                   finished=bool(config.get("finished")) and os.path.isfile(weights))


def attempt_without_checkpoint(folder: str) -> bool:
    """True if ``folder`` holds only what a training attempt writes before its first checkpoint
    (config.json not finished, train log, TensorBoard, no ``checkpoints/latest``): the stub a
    process killed during ``--overwrite`` leaves, which its moved-aside old run may replace."""
    entries = set(os.listdir(folder))
    if not entries <= {CONFIG, TRAIN_LOG, TENSORBOARD, CHECKPOINTS} or \
            os.path.isfile(os.path.join(folder, CHECKPOINTS, "latest")):
        return False
    try:
        with open(os.path.join(folder, CONFIG)) as fh:
            return not json.load(fh).get("finished")
    except (OSError, ValueError, AttributeError):
        return CONFIG not in entries


def checkpoint_error(run_dir: str, prefix: str, exc: BaseException) -> str:
    """The message for a checkpoint ``prefix`` that cannot be read: it names the files and the
    newest earlier checkpoint of ``run_dir`` whose every tensor reads (TensorFlow imported here)."""
    import tensorflow as tf

    ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
    bad = os.path.basename(os.path.dirname(prefix))
    text = " ".join(str(exc).split())[:200]
    intact = None
    for folder in sorted(glob.glob(os.path.join(ckpt_dir, "step_*")), reverse=True):
        if os.path.basename(folder) >= bad:
            continue
        try:
            reader = tf.train.load_checkpoint(os.path.join(folder, "ckpt"))
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
        except Exception:  # noqa: BLE001 - any unreadable checkpoint is skipped
            continue
        intact = folder
        break
    files = ", ".join(sorted(glob.glob(prefix + ".*"))) or prefix
    hint = (f"the earlier checkpoint {intact} is intact: to resume from it write {os.path.basename(intact)} into "
            f"{os.path.join(ckpt_dir, 'latest')} and rerun with --resume" if intact else
            f"no earlier checkpoint in {ckpt_dir} is intact: retrain with --overwrite")
    return (f"{prefix}: checkpoint {bad} cannot be read ({type(exc).__name__}: {text}); its files ({files}) are "
            f"truncated or corrupt; {hint}. {os.path.join(run_dir, CONFIG)} is left as it was")


def read_train_logs(folders: Dict[str, str]) -> Dict:
    """``{name: train_log.csv as a DataFrame}`` for the run folders ``{name: folder}`` that have one
    (columns step, loss, similarity, regularization, ncc, val_loss, val_ncc, sec_per_step)."""
    import pandas as pd

    return {name: pd.read_csv(os.path.join(folder, TRAIN_LOG)) for name, folder in folders.items()
            if os.path.isfile(os.path.join(folder, TRAIN_LOG))}


def read_json(path: str, what: str, required: Sequence[str] = (), fix: str = "") -> Dict:
    """A JSON object from ``path``; a truncated, non-UTF-8 or non-object file, or one without a
    ``required`` key, raises ``ValueError`` naming the file (and the key) and ``fix``."""
    hint = f": {fix}" if fix else ""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable {what}, truncated or corrupt ({type(e).__name__}: {e}){hint}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} is a JSON {type(data).__name__}, not an object{hint}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path}: {what} lacks the key(s) {', '.join(repr(k) for k in missing)}{hint}")
    return data


def read_table(path: str, fix: str = ""):
    """A stage CSV as a DataFrame whose ``pair_id`` column (if any) holds the ids as written
    (``NA``, ``None``, ``nan`` stay strings, never NaN). A file that is not UTF-8, not a CSV table,
    empty or only a header raises ``ValueError`` naming it and ``fix``."""
    import pandas as pd

    hint = f": {fix}" if fix else ""
    try:
        table = pd.read_csv(path, encoding="utf-8-sig")
        if PAIR_ID in table:
            table[PAIR_ID] = pd.read_csv(path, encoding="utf-8-sig", usecols=[PAIR_ID], dtype=str,
                                         keep_default_na=False)[PAIR_ID]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}){hint}") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file{hint}") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: not a readable CSV table ({' '.join(str(e).split())}){hint}") from None
    if table.empty:
        raise ValueError(f"{path}: no rows, only a header{hint}")
    return table


@dataclass(frozen=True)
class Identification:
    """An identification folder: its per-pair parameter table and metadata."""

    folder: str
    meta: Dict = field(repr=False)
    table: "object" = field(repr=False)   # pandas DataFrame indexed by pair_id
    method: str             # 'grid' | 'gradient'
    protocol: str           # 'oracle' | 'population'
    objective: str          # 'dice' | 'epe' (gradient method; 'dice' for the grid)
    regularizer: str
    split: str
    global_run: Optional[str]
    class_names: List[str]

    @property
    def csv(self) -> str:
        return os.path.join(self.folder, IDENTIFIED_PARAMETERS)

    @property
    def data(self) -> Dict:
        return self.meta["data"]

    @property
    def pair_ids(self) -> List[str]:
        return list(self.table.index)

    @property
    def suffix(self) -> str:
        """Row-name suffix in Table 1: '' (grid), ' (gradient)', ' (gradient-epe)'."""
        if self.method == "grid":
            return ""
        return f" ({self.method}{'-' + self.objective if self.objective != 'dice' else ''})"


def read_identification(folder: str, regularizer: Optional[str] = None,
                        columns: Sequence[str] = ()) -> Identification:
    """Read ``identified_parameters.csv`` and ``identification.json`` of ``folder``.

    ``regularizer`` and ``columns`` (e.g. :func:`sa_columns`) make a folder of another
    regularizer or without those columns fail with a message naming the file.
    """
    csv_path = os.path.join(folder, IDENTIFIED_PARAMETERS)
    meta_path = os.path.join(folder, IDENTIFICATION_META)
    for path in (csv_path, meta_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; run parameter_identification.py first")
    meta = read_json(meta_path, "identification record", required=(REGULARIZER, "data"),
                     fix="rerun parameter_identification.py")
    if regularizer is not None and meta["regularizer"] != regularizer:
        raise ValueError(f"{meta_path}: identification was done for the {meta['regularizer']} regularizer, "
                         f"not {regularizer}")
    table = read_table(csv_path, fix="rerun parameter_identification.py")
    missing = [c for c in [PAIR_ID, *columns] if c not in table]
    if missing:
        raise ValueError(f"{csv_path}: columns {missing} missing for the SA model (columns {list(columns)})")
    return Identification(folder=folder, meta=meta, table=table.set_index(PAIR_ID),
                          method=meta.get("method", "grid"), protocol=meta.get("protocol", "oracle"),
                          objective=meta.get("objective", "dice"), regularizer=meta["regularizer"],
                          split=meta.get("split", ""), global_run=meta.get("global_run"),
                          class_names=list(meta.get("class_names", [])))


def load_dataset(config: Dict, data_dir: Optional[str] = None, label_dir: Optional[str] = None):
    """Rebuild the dataset a run was trained on (``config['data']``), optionally with moved folders."""
    return datasets.dataset_from_config(config["data"], data_dir, label_dir)
