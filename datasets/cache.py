"""The synthetic-pair cache codec: the generator version in the cache file name, and the
structure-preserving JSON encoding of the non-array parts of a pair (Lame parameters, meta)
stored inside the ``.npz``.

The cache key is ``v<GENERATOR_VERSION>-<first 10 hex of sha1(generator source file)>``: any edit of
``datasets/phantoms.py`` (even a comment) gives new cache file names, so a changed generator
never reuses old phantoms.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np


def _generator_version(module) -> str:
    parts = []
    for attr in ("GENERATOR_VERSION", "VERSION", "__version__"):
        value = getattr(module, attr, None)
        if value is not None:
            parts.append(str(value))
            break
    src = getattr(module, "__file__", None)
    if src and os.path.isfile(src):
        with open(src, "rb") as fh:
            parts.append(hashlib.sha1(fh.read()).hexdigest()[:10])
    version = "-".join(parts) if parts else "0"
    return "v" + re.sub(r"[^A-Za-z0-9.-]", "_", version)


def _encode(value):
    """Structure-preserving JSON encoding (dict/tuple/list/ndarray/numpy scalars)."""
    if isinstance(value, dict):
        return {"d": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"t": [_encode(v) for v in value]}
    if isinstance(value, list):
        return {"l": [_encode(v) for v in value]}
    if isinstance(value, np.ndarray):
        return {"a": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value):
    if isinstance(value, dict):
        if "d" in value:
            return {_decode(k): _decode(v) for k, v in value["d"]}
        if "t" in value:
            return tuple(_decode(v) for v in value["t"])
        if "l" in value:
            return [_decode(v) for v in value["l"]]
        if "a" in value:
            return np.asarray(value["a"], dtype=value["dtype"])
    return value


def _roundtrip(value):
    return _decode(json.loads(json.dumps(_encode(value))))
