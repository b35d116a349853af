"""The one atomic file writer of the codebase: :func:`atomic_write`.

Used for everything that writes a file a reader might see half-written: dataset caches, run
configs, weights, logs, CSV tables, NIfTI outputs, figures. A reader sees the old file or the
complete new one, never a partial file; on any error the temporary file is removed and the old
file (if any) is left untouched. New files get the permissions of a plain ``open(path, "w")``:
``0o666 & ~umask`` (0644 under the usual umask 022), not the 0600 of a bare ``tempfile.mkstemp``.
Standard library only.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Union

__all__ = ["atomic_write"]

Writer = Callable[[str], object]


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_suffix(name: str) -> str:
    """The extension a writer may rely on: ``.nii.gz``/``.tar.gz`` kept whole, else the last one."""
    for double in (".nii.gz", ".tar.gz"):
        if name.endswith(double):
            return double
    return os.path.splitext(name)[1]


def _write_data(tmp: str, data: Union[bytes, str]) -> None:
    mode, kwargs = ("wb", {}) if isinstance(data, (bytes, bytearray, memoryview)) else ("w", {"encoding": "utf-8"})
    with open(tmp, mode, **kwargs) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: str, data: Union[bytes, str, Writer, object]) -> str:
    """Write ``path`` atomically and return it.

    ``data`` is ``bytes`` (written as is), ``str`` (written as UTF-8 text), a table with a
    pandas-style ``to_csv`` (written as CSV without its index), or a writer
    ``callable(tmp_path)`` that creates the file at ``tmp_path`` itself, e.g.
    ``lambda tmp: np.savez_compressed(tmp, **arrays)``,
    ``lambda tmp: nib.save(img, tmp)``, ``lambda tmp: model.save_weights(tmp)``. Bytes and text
    are fsynced before the rename.

    The temporary file lives in the destination folder (same file system, so ``os.replace`` is
    atomic), is hidden (``.tmp-<name>-XXXX<ext>``) and keeps the destination's extension (h5py,
    numpy, pandas and nibabel choose the format from it). The destination folder is created if
    needed. A writer that raises leaves ``path`` as it was and no temporary file behind.
    """
    if hasattr(data, "to_csv") and not callable(data):  # a pandas DataFrame (no pandas import here)
        table = data
        data = lambda tmp: table.to_csv(tmp, index=False)  # noqa: E731
    if not (isinstance(data, (bytes, bytearray, memoryview, str)) or callable(data)):
        raise TypeError(f"atomic_write({path!r}): data must be bytes, str or a writer callable(tmp_path) "
                        f"(or a DataFrame), got {type(data).__name__}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    suffix = _file_suffix(name)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name[: len(name) - len(suffix)]}-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        if callable(data):
            data(tmp)
        else:
            _write_data(tmp, data)
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
    return path
