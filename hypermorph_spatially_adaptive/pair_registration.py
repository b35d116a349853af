"""Register one pair of images with a trained run: :func:`register` / :class:`PairRegistrar`.

The practitioner's entry point (``register.py`` is its command line). Inputs are NIfTI paths,
nibabel images, ``(array, affine)`` tuples or bare arrays (taken to lie on the training spacing,
axis-aligned). Steps, each timed (``result.seconds``):

1. ``check`` (no model loaded yet): the run is finished (``artifacts.read_run``); files exist
   and read (a header declaring more than :data:`MAX_VOXELS` voxels is refused before the data
   are read), affines are invertible, images real and finite, the images have the model's
   dimension (2D/3D), label maps share their image's shape *and* affine and lie in ``0..C`` of
   the model's classes (range checked in the stored type, before any cast), fixed and moving
   fields of view overlap (warning below :data:`OVERLAP_WARN`), the parameters resolve (names
   once each, range, identification folder), refinement of an SA model has a fixed
   segmentation. Every problem raises a one-line ``ValueError``/``FileNotFoundError``.
2. ``load``: the run folder alone (``config.json``, ``weights.h5``; a global run for grid
   identification).
3. ``resample``: intensities normalized as in training (:func:`intensity_normalizer`, chosen by
   the run's ``config['data']['name']``), then images and labels resampled to the model grid
   (:mod:`.pair_geometry` documents the rule; a warning when the grid's spacing differs from
   training by > 25 %).
4. ``identify`` (optional): grid search with the global model (:mod:`.grid_identification`, as
   ``parameter_identification.py``) or Adam on the run's own hyperparameters
   (:mod:`.gradient_identification`), both on the pair's labels.
5. ``forward``: one forward pass (:class:`.forward.Registrar`); ``refine``: N Adam steps
   on the training loss (:class:`.refinement.Refiner`, model-grid spacing).
6. ``output``: the displacement back on the fixed grid; moving image (original intensities,
   linear) and labels (nearest neighbour) warped onto the fixed grid.

The returned :class:`PairResult` holds ``warped``, ``warped_seg``, ``disp`` (fixed-grid voxels,
``warped(x) = moving(x + disp(x))`` when the moving image shares the fixed grid), ``disp_mm``
(world RAS mm) and :meth:`PairResult.itk_field` (ITK/ANTs displacement field, see
:mod:`.pair_geometry`). Parameters (:func:`resolve_params`): ``{name: value}`` with the run's
hyperparameter names (``lambda_lung``; ``lambda=`` / ``mu=`` set every class not named), a
vector of length P, or the strings ``"name=value"`` / numbers of the command line.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

import datasets
from datasets.atomic import atomic_write
from datasets.learn2reg import normalize_ct
from datasets.nifti import minmax_scale, read_nifti

from . import pair_geometry as geo
from . import run_folder
from .artifacts import RunInfo, global_columns, read_identification, read_run, sa_columns
from .configs import LossConfig, RefineConfig, check_same_weighting
from .forward import Registrar

ImageLike = Union[str, "os.PathLike", np.ndarray, Tuple[np.ndarray, np.ndarray], object]
IDENTIFY_METHODS = ("grid", "gradient")
#: largest image accepted (voxels; 2^28 = 512 x 512 x 1024): checked from the header before the
#: data are read (resampling works in float64, ~2 GB per copy at this size)
MAX_VOXELS = 2 ** 28
#: a label map's affine may differ from its image's by this much (mm; NIfTI stores float32)
AFFINE_TOLERANCE_MM = 1e-3
#: warn when less than this fraction of the fixed image's field of view is covered by the moving one
OVERLAP_WARN = 0.5


# ---- inputs -----------------------------------------------------------------------------------
@dataclass
class Volume:
    """An image or label map on a world grid: ``data [*spatial]`` (D = 2 or 3), 4x4 ``affine``."""

    data: np.ndarray
    affine: np.ndarray
    name: str
    stored_shape: Tuple[int, ...]  # the array's shape as given (e.g. (X, Y, 1) for a 2D NIfTI)


def _squeeze(data: np.ndarray) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[..., 0]
    return data


def load_volume(x: ImageLike, what: str, default_affine: np.ndarray, labels: bool = False) -> Volume:
    """``x`` (path, nibabel image, ``(array, affine)`` or array) as a :class:`Volume`.

    A path must exist and be a readable NIfTI; images must be finite, label maps integer >= 0.
    Trailing singleton axes are dropped (a ``(X, Y, 1)`` NIfTI is 2D). ``default_affine`` is used
    for a bare array.
    """
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        if os.path.isdir(path):
            raise ValueError(f"{what} {path} is a folder; give a NIfTI file (.nii or .nii.gz)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} not found: {path}")
        _check_size(_header_shape(path, what), f"{what} {path}")
        data, affine, _ = read_nifti(path, what)
        what = f"{what} {path}"
    elif hasattr(x, "affine") and hasattr(x, "dataobj"):  # nibabel image
        data, affine = np.asarray(x.dataobj), np.asarray(x.affine, np.float64)
    elif isinstance(x, tuple) and len(x) == 2:
        data, affine = np.asarray(x[0]), np.asarray(x[1], np.float64)
    else:
        data, affine = np.asarray(x), np.asarray(default_affine, np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{what}: the affine must be a finite 4x4 matrix, got shape {affine.shape}")
    lin = affine[:3, :3]
    if abs(np.linalg.det(lin)) <= 1e-9 * max(1.0, float(np.abs(lin).max()) ** 3):
        raise ValueError(f"{what}: its affine is singular (a zero voxel size or parallel axes), so its voxels have "
                         f"no place in the world: {np.round(affine, 4).tolist()}; fix the header (sform/qform, pixdim)")
    stored = tuple(data.shape)
    _check_size(stored, what)
    data = _squeeze(np.asarray(data))
    if np.iscomplexobj(data):
        raise ValueError(f"{what} has complex values ({data.dtype}); give a real image, e.g. its magnitude")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise ValueError(f"{what} has unsupported data type {data.dtype}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{what} contains NaN or infinite values")
    if labels:
        if data.size and data.dtype != np.bool_:  # range first, in the stored type: no value may wrap in the cast
            lo, hi = data.min(), data.max()
            if lo < 0:
                raise ValueError(f"{what} has negative labels: {np.unique(data[data < 0])[:10].tolist()}")
            if hi > np.iinfo(np.int32).max:
                raise ValueError(f"{what} has label {hi.item()} ({data.dtype}), far outside any class range; labels are "
                                 f"0 (background) and 1..C")
        if np.any(data != np.round(data)):
            raise ValueError(f"{what} has non-integer label values")
        data = np.round(data).astype(np.int32)
    else:
        data = data.astype(np.float32)
    return Volume(data, np.asarray(affine, np.float64), what, stored)


def _header_shape(path: str, what: str) -> Tuple[int, ...]:
    """The array shape a NIfTI header declares (nothing else is read)."""
    import nibabel as nib

    try:
        return tuple(int(n) for n in nib.load(path).shape)
    except Exception as exc:  # noqa: BLE001 - any unreadable header
        raise ValueError(f"cannot read NIfTI {what} {path}: {type(exc).__name__}: {exc}") from exc


def _check_size(shape: Sequence[int], what: str) -> None:
    n = int(np.prod([int(s) for s in shape], dtype=np.int64)) if len(shape) else 1
    if n > MAX_VOXELS:
        raise ValueError(f"{what} has {n:,} voxels ({' x '.join(str(int(s)) for s in shape)}), above the limit of "
                         f"{MAX_VOXELS:,} (pair_registration.MAX_VOXELS); crop or downsample it")


def _affine_text(a: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{v:g}" for v in row) for row in np.round(np.asarray(a)[:3], 4)) + "]"


def check_same_grid(seg: Volume, img: Volume) -> None:
    """Refuse a label map whose affine differs from its image's (same shape is not enough: a
    shifted header would be resampled from the wrong place); both affines are printed."""
    diff = float(np.abs(np.asarray(seg.affine) - np.asarray(img.affine)).max())
    if diff > AFFINE_TOLERANCE_MM:
        shift = np.asarray(seg.affine)[:3, 3] - np.asarray(img.affine)[:3, 3]
        raise ValueError(f"{seg.name} does not lie on its image's grid: affine {_affine_text(seg.affine)} vs "
                         f"{_affine_text(img.affine)} of {img.name} (largest difference {diff:.4g}, origin shift "
                         f"{np.round(shift, 3).tolist()} mm); a label map must share its image's affine: fix the "
                         "header or resample the labels onto the image")


def overlap_fraction(fixed: Volume, moving: Volume) -> float:
    """Fraction of the fixed image's field of view (voxel edges) covered by the moving one's
    bounding box, in the fixed image's voxel index space (in-plane for 2D)."""
    D = fixed.data.ndim
    T = np.linalg.solve(np.asarray(fixed.affine, np.float64), np.asarray(moving.affine, np.float64))
    shape = moving.data.shape
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(D, -1)
    pts = T[:D, :D] @ corners + T[:D, 3:4]
    lo, hi = pts.min(axis=1), pts.max(axis=1)
    flo, fhi = -0.5 * np.ones(D), np.asarray(fixed.data.shape, np.float64) - 0.5
    inter = np.clip(np.minimum(hi, fhi) - np.maximum(lo, flo), 0, None)
    return float(np.prod(inter / (fhi - flo)))


def check_overlap(fixed: Volume, moving: Volume) -> float:
    """Refuse a moving image whose field of view misses the fixed one's; warn (with the fraction)
    when it covers less than :data:`OVERLAP_WARN` of it. Returns the covered fraction."""
    frac = overlap_fraction(fixed, moving)
    centres = [np.asarray(v.affine, np.float64) @ np.append((np.asarray(v.data.shape) - 1) / 2.0,
                                                              [0.0] * (3 - v.data.ndim) + [1.0])
               for v in (fixed, moving)]
    dist = float(np.linalg.norm(centres[0][:3] - centres[1][:3]))
    if frac <= 0.0:
        raise ValueError(f"{moving.name} and {fixed.name} do not overlap in world space (their centres are "
                         f"{dist:.1f} mm apart); outside its field of view the moving image would only repeat its "
                         "edge values. Check both headers (affines)")
    if frac < OVERLAP_WARN:
        warnings.warn(f"{moving.name} covers only {100 * frac:.0f} % of the field of view of {fixed.name} (centres "
                      f"{dist:.1f} mm apart); outside it the warped image repeats the moving image's edge values",
                      stacklevel=3)
    return frac


def intensity_normalizer(data_config: Mapping):
    """The training intensity normalization of a run's dataset, as ``f(image) -> image in [0, 1]``.

    synthetic: clip to [0, 1] (its images are already in [0, 1]); folder: min-max, after
    clipping at ``clip_percentiles`` if the run used them (``datasets.nifti.minmax_scale``, which
    warns about outliers); nlst / l2r-lung: ``datasets.learn2reg.normalize_ct`` (HU window, min-max,
    the body mask where the run's data used it: the volume's hull, where 2D training masked the
    slice); acdc: min-max
    (``ACDCDataset._normalize``). Every normalizer takes the image's name (for warnings)
    as an optional second argument.
    """
    name = datasets.dataset_class(data_config.get("name", "synthetic")).name
    if name == "synthetic":
        return lambda img, what=None: np.clip(img, 0.0, 1.0).astype(np.float32)
    if name in ("nlst", "l2r-lung"):
        cls = datasets.dataset_class(name)
        body = bool(cls.has_body_mask and data_config.get("body_mask") is not False)  # as dataset_from_config
        return lambda img, what="an input image": normalize_ct(np.asarray(img, np.float64), cls.hu_window, body, what)
    if name == "acdc":
        return lambda img, what=None: _scale(img, *datasets.ACDCDataset._normalize(img))
    else:  # folder

        pct = data_config.get("clip_percentiles")
        return lambda img, what="an input image": minmax_scale(img, pct or None, what)


def _scale(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        warnings.warn("an input image is constant; it becomes all zeros", stacklevel=3)
        return np.zeros_like(img, np.float32)
    return ((np.clip(img, lo, hi) - lo) / (hi - lo)).astype(np.float32)


# ---- parameters -------------------------------------------------------------------------------
def param_names(info: RunInfo) -> List[str]:
    """The run's hyperparameter names in input order (``lambda_background`` ... or ``lambda, mu``)."""
    return sa_columns(info.regularizer, info.class_names) if info.spatially_adaptive else info.spec.names()


def resolve_params(params, names: Sequence[str]) -> np.ndarray:
    """``hyp [P]`` from ``{name: value}``, a length-P vector, or command-line strings.

    Strings are ``name=value`` or P numbers. A field name alone (``lambda``, ``mu``) sets every
    class of that field not named individually. Every value must lie in [0, 1]; unknown or missing
    names raise a ``ValueError`` listing the valid ones.
    """
    names = list(names)
    if isinstance(params, Mapping):
        items = {str(k): v for k, v in params.items()}
    else:
        seq = list(np.atleast_1d(params)) if not isinstance(params, str) else [params]
        if all(not isinstance(v, str) or "=" not in v for v in seq):
            try:
                vec = np.asarray([float(v) for v in seq], np.float64)
            except ValueError:
                raise ValueError(f"parameters {seq}: give name=value pairs (names: {', '.join(names)}) "
                                 f"or {len(names)} numbers") from None
            if vec.size != len(names):
                raise ValueError(f"{vec.size} parameter values given, the model takes {len(names)} "
                                 f"({', '.join(names)})")
            return _check_range(vec, names)
        items = {}
        for v in seq:
            key, sep, val = str(v).partition("=")
            if not sep:
                raise ValueError(f"parameter {v!r}: expected name=value (names: {', '.join(names)})")
            if key.strip() in items:
                raise ValueError(f"parameter {key.strip()} given twice ({key.strip()}={items[key.strip()]} and "
                                 f"{key.strip()}={val}); give each name once")
            items[key.strip()] = val
    out: Dict[str, float] = {}
    fields = sorted({n.split("_", 1)[0] for n in names})
    for key, val in items.items():
        try:
            val = float(val)
        except (TypeError, ValueError):
            raise ValueError(f"parameter {key}: {val!r} is not a number") from None
        if key not in names and key not in fields:
            raise ValueError(f"unknown parameter {key!r}; the model takes {', '.join(names)} "
                             f"(or {', '.join(fields)} for every class)")
        out[key] = val
    vec = []
    for n in names:
        field_name = n.split("_", 1)[0]
        if n in out:
            vec.append(out[n])
        elif field_name in out:
            vec.append(out[field_name])
        else:
            missing = [m for m in names if m not in out and m.split("_", 1)[0] not in out]
            raise ValueError(f"parameters {missing} not given (give each, or {field_name}=VALUE for every class)")
    return _check_range(np.asarray(vec, np.float64), names)


def _check_range(vec: np.ndarray, names: Sequence[str]) -> np.ndarray:
    bad = [f"{n}={v:g}" for n, v in zip(names, vec) if not (np.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise ValueError(f"parameters must lie in [0, 1]: {', '.join(bad)}")
    return vec.astype(np.float32)


def params_from_identification(folder: str, info: RunInfo, pair_id: Optional[str] = None) -> np.ndarray:
    """``hyp [P]`` for ``info``'s model from an identification folder.

    The SA columns for an SA run, ``g_lambda[, g_mu]`` for a global run. A population-protocol
    folder has one setting for all pairs; otherwise ``pair_id`` picks the row.
    """
    cols = param_names(info) if info.spatially_adaptive else global_columns(info.regularizer)
    ident = read_identification(folder, info.regularizer, cols)
    if ident.class_names and list(ident.class_names) != list(info.class_names):
        raise ValueError(f"{ident.csv}: identified for classes {ident.class_names}, the run {info.folder} "
                         f"has {info.class_names}")
    if ident.meta.get("data") not in (None, info.data):
        raise ValueError(f"{ident.csv}: identified on dataset {ident.data}, but {info.folder} was trained on {info.data}")
    table = ident.table[cols]
    if pair_id is not None:
        if pair_id not in table.index:
            raise ValueError(f"{ident.csv}: no pair {pair_id!r} (pairs: {', '.join(ident.pair_ids[:5])}, ...)")
        row = table.loc[pair_id]
    elif len(table.drop_duplicates()) == 1:
        row = table.iloc[0]
    else:
        raise ValueError(f"{ident.csv} holds per-pair ({ident.protocol}) parameters that differ between pairs; "
                         "choose a row with --ident-pair, or use a population-protocol folder")
    return _check_range(row.to_numpy(np.float64), cols)


# ---- result -----------------------------------------------------------------------------------
@dataclass
class PairResult:
    """One registered pair on the fixed image's grid (shapes: the fixed image's spatial shape).

    ``warped`` float32 (the moving image's original intensities), ``warped_seg`` int32 or None,
    ``disp [*spatial, D]`` fixed-grid voxels, ``disp_mm [*spatial, 3]`` world (RAS) mm, ``affine``
    the fixed image's; ``hyp``/``param_names`` the parameters used; ``grid`` the model grid;
    ``u_model [*model, D]`` the model-grid displacement; ``seconds`` per step; ``refine_loss``
    (before, after) or None.
    """

    warped: np.ndarray
    warped_seg: Optional[np.ndarray]
    disp: np.ndarray
    disp_mm: np.ndarray
    affine: np.ndarray
    hyp: np.ndarray
    param_names: List[str]
    grid: geo.ModelGrid
    u_model: np.ndarray
    seconds: Dict[str, float] = field(default_factory=dict)
    refine_loss: Optional[Tuple[float, float]] = None
    fixed_stored_shape: Tuple[int, ...] = ()

    def itk_field(self):
        """The ITK/ANTs displacement field (nibabel image; convention in :mod:`.pair_geometry`)."""
        return geo.itk_displacement_image(self.disp_mm, self.affine)

    def params(self) -> Dict[str, float]:
        return {n: round(float(v), 6) for n, v in zip(self.param_names, self.hyp)}


# ---- the registrar ----------------------------------------------------------------------------
def _check_orientation(code: str) -> str:
    """``code`` upper-cased if it is three nibabel axis codes (one of L/R, P/A, I/S each)."""
    import nibabel as nib

    code = str(code).upper()
    try:
        ornt = nib.orientations.axcodes2ornt(tuple(code))
    except ValueError:
        ornt = None
    if len(code) != 3 or ornt is None or np.isnan(ornt).any() or sorted(ornt[:, 0]) != [0, 1, 2]:
        raise ValueError(f"orientation {code!r}: expected three axis codes such as RAS or LPS")
    return code


@dataclass
class _Inputs:
    fixed: Volume
    moving: Volume
    fixed_seg: Optional[Volume]
    moving_seg: Optional[Volume]
    hyp: Optional[np.ndarray]


class PairRegistrar:
    """A loaded run (and optional global run) that registers pairs: ``PairRegistrar(run)(fixed, moving, ...)``.

    ``run``: run folder of a trained model (SA or global); ``global_run``: a global run of the same
    regularizer and classes, needed only for grid identification with an SA run.
    ``orientation``: the training orientation code (:func:`.pair_geometry.model_grid`).
    ``load=False`` reads only the configs (for :meth:`check`).
    """

    def __init__(self, run: str, global_run: Optional[str] = None, orientation: str = "RAS", load: bool = True):
        self.info = read_run(run)
        if not os.path.isfile(self.info.weights):
            raise FileNotFoundError(f"{self.info.weights}: no final weights (training unfinished?)")
        self.global_info = None
        if global_run is not None:
            self.global_info = read_run(global_run, expect_regularizer=self.info.regularizer, expect_sa=False)
            if self.global_info.class_names != self.info.class_names:
                raise ValueError(f"{global_run} has classes {self.global_info.class_names}, {run} "
                                 f"{self.info.class_names}")
            check_same_weighting({run: self.info.config, global_run: self.global_info.config})
        self.orientation = _check_orientation(orientation)
        self.model_shape = tuple(int(s) for s in self.info.config["model"]["image_shape"])
        self.train_spacing = LossConfig.from_run_config(self.info.config).spacing
        self.normalize = intensity_normalizer(self.info.data)
        self.names = param_names(self.info)
        self.load_seconds = 0.0
        self._model = self._global_model = self._registrar = None
        if load:
            self.load()

    @property
    def model(self):
        """The run's Keras model (loaded on first use)."""
        self.load()
        return self._model

    def load(self) -> None:
        t0 = time.perf_counter()
        if self._model is None:
            self._model, _ = run_folder.load_run(self.info.folder)
            self._registrar = Registrar(self._model)
        if self.global_info is not None and self._global_model is None:
            self._global_model, _ = run_folder.load_run(self.global_info.folder)
        self.load_seconds += time.perf_counter() - t0

    # -- step 1: checks before any model is loaded ---------------------------------------------
    def check(self, fixed: ImageLike, moving: ImageLike, fixed_seg: Optional[ImageLike] = None,
              moving_seg: Optional[ImageLike] = None, params=None, ident: Optional[str] = None,
              ident_pair: Optional[str] = None, identify: Optional[str] = None, refine: int = 0) -> _Inputs:
        """Read and validate the inputs (module docstring, step 1); returns them as volumes."""
        D = len(self.model_shape)
        default = np.diag([*(self.train_spacing or [1.0] * D), *[1.0] * (4 - D)])
        C = self.info.num_classes
        vols = {}
        for key, x, lab in (("fixed", fixed, False), ("moving", moving, False), ("fixed_seg", fixed_seg, True),
                            ("moving_seg", moving_seg, True)):
            if x is None:
                vols[key] = None
                continue
            what = key.replace("_seg", " segmentation") + ("" if lab else " image")
            base = vols[key.replace("_seg", "")].affine if lab else default
            v = load_volume(x, what, base, labels=lab)
            if v.data.ndim != D:
                kind = {2: "2D", 3: "3D"}.get(v.data.ndim, f"{v.data.ndim}D")
                raise ValueError(f"{v.name} is {kind} {v.data.shape}, but the model {self.info.folder} is "
                                 f"{D}D {self.model_shape}")
            if lab:
                img = vols[key.replace("_seg", "")]
                if v.data.shape != img.data.shape:
                    raise ValueError(f"{v.name} has shape {v.data.shape}, its image {img.data.shape}")
                check_same_grid(v, img)
                if v.data.size and v.data.max() > C:
                    raise ValueError(f"{v.name} has labels outside 0..{C} (the model's classes "
                                     f"{', '.join(self.info.class_names)}): {np.unique(v.data).tolist()}")
            vols[key] = v
        check_overlap(vols["fixed"], vols["moving"])
        fseg = vols["fixed_seg"]
        if fseg is not None and self.info.spatially_adaptive and fseg.data.size and fseg.data.max() == 0:
            warnings.warn(f"{fseg.name} is all background (label 0): the spatially adaptive model uses the "
                          "background's parameters everywhere", stacklevel=3)
        given = [n for n, v in (("--params", params), ("--ident", ident), ("--identify", identify)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of --params, --ident, --identify (got {given or 'none'})")
        hyp = None
        if params is not None:
            hyp = resolve_params(params, self.names)
        elif ident is not None:
            hyp = params_from_identification(ident, self.info, ident_pair)
        else:
            self._check_identify(identify, vols)
        if refine and self.info.spatially_adaptive and vols["fixed_seg"] is None:
            raise ValueError("refining with a spatially adaptive model needs the fixed segmentation (--fixed-seg)")
        if self.info.config["model"].get("conditioning", "hypernetwork") == "csain" and vols["fixed_seg"] is None:
            raise ValueError("a CSAIN run builds its conditioning map from the fixed segmentation: give --fixed-seg")
        if refine < 0:
            raise ValueError(f"refine must be >= 0, got {refine}")
        return _Inputs(vols["fixed"], vols["moving"], vols["fixed_seg"], vols["moving_seg"], hyp)

    def _check_identify(self, identify: str, vols: Dict) -> None:
        if identify not in IDENTIFY_METHODS:
            raise ValueError(f"identify must be one of {IDENTIFY_METHODS}, got {identify!r}")
        if vols["fixed_seg"] is None or vols["moving_seg"] is None:
            raise ValueError(f"--identify {identify} needs both segmentations (--fixed-seg and --moving-seg)")
        if identify == "grid" and self.info.spatially_adaptive and self.global_info is None:
            raise ValueError("--identify grid with a spatially adaptive run needs --global-run (the grid "
                             "search runs on the global model)")

    # -- steps 2-6 -----------------------------------------------------------------------------
    def __call__(self, fixed: ImageLike, moving: ImageLike, params=None, fixed_seg: Optional[ImageLike] = None,
                 moving_seg: Optional[ImageLike] = None, refine: int = 0, refine_lr: float = 0.1,
                 ident: Optional[str] = None, ident_pair: Optional[str] = None, identify: Optional[str] = None,
                 grid_steps: int = 11, gradient_steps: int = 50, gradient_lr: float = 0.05,
                 refine_options: Optional[RefineConfig] = None) -> PairResult:
        """Register ``moving`` onto ``fixed`` (module docstring); returns a :class:`PairResult`.
        ``refine_options``: :class:`.configs.RefineConfig` of the refinement (default
        ``RefineConfig()``, the defaults of the command line)."""
        seconds: Dict[str, float] = {}
        t0 = time.perf_counter()
        inp = self.check(fixed, moving, fixed_seg, moving_seg, params, ident, ident_pair, identify, refine)
        seconds["check"] = time.perf_counter() - t0
        before = self.load_seconds
        self.load()
        seconds["load"] = self.load_seconds - before

        t0 = time.perf_counter()
        grid = geo.model_grid(inp.fixed.affine, inp.fixed.data.shape, self.model_shape, self.orientation)
        msg = geo.spacing_warning(grid, self.train_spacing)
        if msg:
            warnings.warn(msg, stacklevel=2)
        fixed_m, moving_m = (geo.resample(self.normalize(v.data, v.name), v.affine, grid.affine, grid.shape, 1)
                             for v in (inp.fixed, inp.moving))
        segs = [None if v is None else geo.resample(v.data, v.affine, grid.affine, grid.shape, 0)
                for v in (inp.fixed_seg, inp.moving_seg)]
        seconds["resample"] = time.perf_counter() - t0

        hyp = inp.hyp
        if hyp is None:
            t0 = time.perf_counter()
            hyp = self._identify(identify, moving_m, fixed_m, *segs, grid_steps, gradient_steps, gradient_lr)
            seconds["identify"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fseg_m = None if segs[0] is None else np.rint(segs[0]).astype(np.int32)[None]  # CSAIN input
        _, disp = self._registrar(moving_m[..., None], fixed_m[..., None], hyp[None], fseg_m)
        u = disp[0]
        seconds["forward"] = time.perf_counter() - t0
        refine_loss = None
        if refine:
            t0 = time.perf_counter()
            u, refine_loss = self._refine(moving_m, fixed_m, u, hyp, segs[0], grid, refine, refine_lr, refine_options)
            seconds["refine"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        result = self._on_fixed_grid(inp, grid, u, hyp)
        seconds["output"] = time.perf_counter() - t0
        result.seconds, result.refine_loss = seconds, refine_loss
        return result

    def _on_fixed_grid(self, inp: _Inputs, grid: geo.ModelGrid, u: np.ndarray, hyp: np.ndarray) -> PairResult:
        """Step 6: the model-grid displacement ``u`` on the fixed grid, moving image and labels warped."""
        fshape = inp.fixed.data.shape
        d_mm = geo.world_displacement(u, grid, inp.fixed.affine, fshape)
        points = geo.grid_points(inp.fixed.affine, fshape) + d_mm
        warped = geo.sample_at_world(inp.moving.data, inp.moving.affine, points, 1)
        warped_seg = (None if inp.moving_seg is None
                      else geo.sample_at_world(inp.moving_seg.data, inp.moving_seg.affine, points, 0))
        return PairResult(warped=warped, warped_seg=warped_seg, disp=geo.voxel_displacement(d_mm, inp.fixed.affine),
                          disp_mm=d_mm.astype(np.float32), affine=inp.fixed.affine, hyp=np.asarray(hyp, np.float32),
                          param_names=list(self.names), grid=grid, u_model=np.asarray(u, np.float32),
                          fixed_stored_shape=inp.fixed.stored_shape)

    def _identify(self, method: str, moving_m, fixed_m, fseg, mseg, grid_steps: int, gradient_steps: int,
                  lr: float) -> np.ndarray:
        """The pair's parameters for this run's model, identified on its model-grid labels."""
        if method == "gradient":
            from .gradient_identification import identify_by_gradient

            res = identify_by_gradient(self._model, moving_m[None, ..., None], fixed_m[None, ..., None], fseg[None],
                                       mseg[None], steps=gradient_steps, lr=lr, num_classes=self.info.num_classes,
                                       pair_ids=["pair"])
            return res.h[0].astype(np.float32)

        from . import grid_identification as ident

        g_model = self._model if not self.info.spatially_adaptive else self._global_model
        pair = datasets.RegistrationPair("pair", moving_m[..., None], fixed_m[..., None], mseg, fseg,
                                         tuple(self.train_spacing or ()))
        grid = ident.make_grid(self.info.regularizer, ident.grid_values(grid_steps))
        table = ident.grid_dice(Registrar(g_model), pair, grid, self.info.class_names)
        row = ident.choose_parameters(table, self.info.regularizer, self.info.class_names).iloc[0]
        cols = self.names if self.info.spatially_adaptive else global_columns(self.info.regularizer)
        return row[cols].to_numpy(np.float32)

    def _refine(self, moving_m, fixed_m, u, hyp, fseg, grid: geo.ModelGrid, steps: int, lr: float,
                options: Optional[RefineConfig] = None):
        from .refinement import Refiner

        # the run's loss (K, mapping, NCC window) at the model grid's spacing
        refiner = Refiner.from_config(self.info.config, spacing=grid.spacing, options=options)
        u_ref, before, after = refiner(moving_m[None, ..., None], fixed_m[None, ..., None], u[None], hyp[None],
                                       None if fseg is None else fseg[None], steps, lr)
        return u_ref[0], (float(before[0]), float(after[0]))


def register(fixed: ImageLike, moving: ImageLike, run: str, params=None, fixed_seg: Optional[ImageLike] = None,
             moving_seg: Optional[ImageLike] = None, refine: int = 0, global_run: Optional[str] = None,
             orientation: str = "RAS", **kw) -> PairResult:
    """Register ``moving`` onto ``fixed`` with the trained run folder ``run`` (module docstring).

    Args:
        fixed, moving: NIfTI path, nibabel image, ``(array, affine)`` or array ``[*spatial]``
            (D = the model's dimension; an array without affine lies on the training spacing).
        run: run folder of a trained SA or global model.
        params: the model's hyperparameters (:func:`resolve_params`); or pass ``ident=DIR``
            (identification folder, ``ident_pair=ID`` for per-pair folders) or
            ``identify='grid'|'gradient'`` (needs both segmentations; grid with an SA run needs
            ``global_run``). Exactly one of the three.
        fixed_seg, moving_seg: label maps 0..C on their image's grid (optional).
        refine: Adam steps of instance optimization (``refine_lr``, default 0.1 voxel).
        orientation: training orientation code (default RAS, the identity affine).
        **kw: ``refine_lr``, ``ident``, ``ident_pair``, ``identify``, ``grid_steps``,
            ``gradient_steps``, ``gradient_lr``, ``refine_options`` (see :meth:`PairRegistrar.__call__`).

    Returns:
        :class:`PairResult` on the fixed image's grid.
    """
    registrar = PairRegistrar(run, global_run, orientation, load=False)  # inputs are checked before loading
    return registrar(fixed, moving, params, fixed_seg, moving_seg, refine, **kw)


def save_result(result: PairResult, warped: Optional[str] = None, disp: Optional[str] = None,
                itk_warp: Optional[str] = None, warped_seg: Optional[str] = None) -> List[str]:
    """Write the chosen outputs as NIfTI with the fixed image's affine; returns the paths written.

    ``warped`` float32 in the fixed image's stored shape; ``warped_seg`` int16; ``disp`` float32
    ``[*spatial, D]`` in fixed-grid voxels (the layout of ``inference.py --save-nifti``);
    ``itk_warp`` the ITK/ANTs field (:meth:`PairResult.itk_field`). All images are built first,
    then each file is written atomically (:func:`datasets.atomic.atomic_write`).
    """
    import nibabel as nib

    if warped_seg is not None and result.warped_seg is None:
        raise ValueError("a warped segmentation output needs the moving segmentation")
    shape = result.fixed_stored_shape or result.warped.shape
    images = []
    if warped is not None:
        images.append((warped, nib.Nifti1Image(result.warped.reshape(shape).astype(np.float32), result.affine)))
    if warped_seg is not None:
        images.append((warped_seg, nib.Nifti1Image(result.warped_seg.reshape(shape).astype(np.int16), result.affine)))
    if disp is not None:
        images.append((disp, nib.Nifti1Image(result.disp.astype(np.float32), result.affine)))
    if itk_warp is not None:
        images.append((itk_warp, result.itk_field()))
    for path, img in images:
        atomic_write(path, lambda tmp, im=img: nib.save(im, tmp))
    return [p for p, _ in images]
