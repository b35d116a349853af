"""Atomic file writing for the data side (cache files)."""
from __future__ import annotations

import os

import numpy as np


def atomic_write_npz(path: str, payload: dict) -> None:
    """``np.savez_compressed(path, **payload)`` atomically and durably, with the permissions of
    a plain file (``0o666 & ~umask``): the one writer for dataset caches (shared temp-file
    helper :func:`hypermorph_spatially_adaptive.runio.atomic_save`)."""
    from hypermorph_spatially_adaptive.runio import atomic_save

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_save(path, write)
