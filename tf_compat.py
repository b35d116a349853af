"""Compatibility shims that must run *before* TensorFlow / voxelmorph / neurite are imported.

Bottom floor of the import graph (see CONVENTIONS.md): standard library only, no numpy or
TensorFlow at import time. **Importing this module applies the shims** (idempotent); the package
``hypermorph_spatially_adaptive``, ``regularizers`` and ``tests/conftest.py`` import it, so every
entry point reaches it before TensorFlow loads.

Four facts about the pinned stack make this module necessary:

1. neurite 0.2 (``neurite/tf/modelio.py``) calls ``inspect.getargspec``, which was
   removed in Python 3.11. We restore it as a thin alias of ``inspect.getfullargspec``
   returning the old 4-tuple ``(args, varargs, varkw, defaults)``.
2. TensorFlow >= 2.16 makes ``tf.keras`` point to Keras 3, but voxelmorph/neurite 0.2 are
   written for Keras 2. With the ``tf-keras`` package installed, setting
   ``TF_USE_LEGACY_KERAS=1`` *before TensorFlow is first imported* makes ``tf.keras`` be
   Keras 2 again. For TensorFlow <= 2.15 the variable is harmless. Measured with TF 2.21:
   the attribute ``tf.keras`` is resolved lazily (setting the variable after ``import
   tensorflow`` but before the first ``tf.keras`` access still yields tf_keras), but the
   module path ``tensorflow.keras`` is fixed when TensorFlow is imported, so neurite's
   ``from tensorflow.keras.losses import ...`` fails (Keras 3) unless the variable was set
   first. Hence "before TensorFlow is imported", and :func:`apply` refuses otherwise.
3. TensorFlow 2.21 prints start-up chatter on every run (absl "log messages before
   absl::InitializeLog()", "Could not find cuda drivers", "failed call to cuInit", oneDNN
   notices, deprecation warnings). Unless the user set ``TF_CPP_MIN_LOG_LEVEL`` themselves,
   :func:`apply` sets it to 2 and installs a one-shot import hook: the first
   ``import tensorflow`` (and its device probe) runs with the process' stderr captured, known
   noise lines are dropped and anything else is passed on; TensorFlow's Python logger is set to
   errors only. Set ``TF_CPP_MIN_LOG_LEVEL=0`` to see everything. oneDNN's "supports DT_INT32
   only on platforms with AVX-512" comes later, at ERROR level, from the first int32 transpose;
   it cannot be provoked at import (running an op fixes the devices, and ``--cpu-replicas``
   configures them later), so :func:`quiet_onednn_notice` provokes it under the filter once the
   devices are set (``models.build_model`` calls it).
4. The trainer's Adam updates run XLA-compiled (``trainer.make_optimizer``: 2.4x faster on CPU,
   where they were ~70 % of a step, benchmarks/README.md "Where a training step's time goes").
   XLA's CPU back end always allows fused multiply-add, which rounds differently from
   TensorFlow's own kernels (measured: weights 1.5e-8 apart after 20 steps). :func:`apply` adds
   ``--xla_cpu_max_isa=AVX`` (:data:`XLA_ISA_FLAG`) to ``XLA_FLAGS`` before TensorFlow loads
   (unless the user set an ISA there): AVX has no FMA, and the XLA updates give bit-identical
   weights (``tests/test_models_training.py``). :func:`xla_matches_tensorflow` tells whether it
   is in effect; the trainer uses XLA only then.

Use :func:`import_voxelmorph` instead of importing voxelmorph or neurite directly anywhere in
this codebase.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.abc
import importlib.util
import inspect
import logging
import os
import platform
import sys
import tempfile
from typing import Iterator

_ArgSpec = collections.namedtuple("ArgSpec", ["args", "varargs", "keywords", "defaults"])


def _getargspec(func):  # pragma: no cover - trivial
    spec = inspect.getfullargspec(func)
    return _ArgSpec(spec.args, spec.varargs, spec.varkw, spec.defaults)


#: substrings of TensorFlow/CUDA start-up lines that carry no information for a user
NOISE = (
    "All log messages before absl::InitializeLog()",
    "cudart_stub.cc", "Could not find cuda drivers", "cuda_platform.cc", "failed call to cuInit",
    "cuda_executor.cc", "Unable to register cu", "TF-TRT Warning", "Could not find TensorRT",
    "oneDNN custom operations", "TF_ENABLE_ONEDNN_OPTS", "This TensorFlow binary is optimized",
    "To enable the following instructions", "rebuild TensorFlow with the appropriate compiler flags",
    "computation_placer", "cpu_feature_guard",
    # oneDNN's once-per-process notice on CPUs without AVX-512, logged at ERROR level (so
    # TF_CPP_MIN_LOG_LEVEL=2 keeps it) by the first int32 transpose: see quiet_onednn_notice
    "oneDNN supports DT_INT32 only on platforms with AVX-512",
)

#: True once apply() installed the start-up filter (the user did not choose a log level)
_FILTERING = False
_ONEDNN_PROBED = False


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Capture file descriptor 2 (C++ logging included); on exit replay all but :data:`NOISE`."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines()
            keep = [ln for ln in lines if ln.strip() and not any(n in ln for n in NOISE)]
            if keep:
                sys.stderr.write("\n".join(keep) + "\n")
                sys.stderr.flush()


def quiet_onednn_notice(tf) -> None:
    """Run one int32 transpose under :func:`filtered_stderr`, once per process, so that oneDNN's
    one-time "DT_INT32 only on platforms with AVX-512" line is dropped. Executing an op
    initializes TensorFlow's devices: call it only after any device configuration. Does nothing
    when the user chose ``TF_CPP_MIN_LOG_LEVEL`` (they see every line)."""
    global _ONEDNN_PROBED
    if _ONEDNN_PROBED or not _FILTERING:
        return
    _ONEDNN_PROBED = True
    with filtered_stderr():
        try:
            tf.transpose(tf.constant([[0, 1], [2, 3]], dtype=tf.int32))
        except Exception:  # pragma: no cover - best effort
            pass


class _QuietLoader:
    """Wraps TensorFlow's loader: module execution and the GPU probe under :func:`filtered_stderr`."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with filtered_stderr():
            self._loader.exec_module(module)
            try:  # the first device probe logs "failed call to cuInit" on machines without GPU
                module.config.list_physical_devices("GPU")
            except Exception:  # pragma: no cover - probing is best effort
                pass
        logging.getLogger("tensorflow").setLevel(logging.ERROR)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """One-shot meta path hook: the first ``import tensorflow`` goes through :class:`_QuietLoader`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        _remove_finder()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowFinder)]


#: XLA flag that keeps XLA's CPU code to the AVX instruction set: no fused multiply-add, so
#: XLA-compiled elementwise arithmetic rounds exactly like TensorFlow's own kernels (fact 4)
XLA_ISA_FLAG = "--xla_cpu_max_isa=AVX"


def _limit_xla_isa() -> None:
    """Add :data:`XLA_ISA_FLAG` to ``XLA_FLAGS`` unless the user chose an ISA there, on x86-64 only
    (the flag names x86 instruction sets; elsewhere the trainer keeps TensorFlow's own Adam)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if platform.machine().lower() in ("x86_64", "amd64") and "xla_cpu_max_isa" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_ISA_FLAG}".strip()


def xla_matches_tensorflow() -> bool:
    """True if XLA's CPU code rounds like TensorFlow's kernels (:data:`XLA_ISA_FLAG` in effect)."""
    return XLA_ISA_FLAG in os.environ.get("XLA_FLAGS", "").split()


def apply() -> None:
    """Install the shims. Idempotent. Must be called before TensorFlow is imported."""
    global _FILTERING
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        _limit_xla_isa()
        # keep TF's C++ start-up chatter (oneDNN notices, CPU feature lines, CUDA probing) out of
        # user output, unless the user chose a log level
        if "TF_CPP_MIN_LOG_LEVEL" not in os.environ or any(
                isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            _FILTERING = True
            if not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _QuietTensorFlowFinder())
    elif os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        import tensorflow as tf  # noqa: F401  (already imported)

        if int(tf.__version__.split(".")[1]) >= 16 and tf.__version__.startswith("2."):
            raise RuntimeError(
                "TensorFlow was imported before tf_compat could set "
                "TF_USE_LEGACY_KERAS=1; voxelmorph 0.2 needs Keras 2. Import tf_compat (or the package) first "
                "or export TF_USE_LEGACY_KERAS=1."
            )
    if not hasattr(inspect, "getargspec"):
        inspect.getargspec = _getargspec  # type: ignore[attr-defined]


def import_voxelmorph():
    """Apply the shims, then import and return ``(tensorflow, voxelmorph, neurite)``."""
    apply()
    os.environ.setdefault("VXM_BACKEND", "tensorflow")
    os.environ.setdefault("NEURITE_BACKEND", "tensorflow")
    import tensorflow as tf
    import neurite as ne
    import voxelmorph as vxm

    return tf, vxm, ne


apply()
