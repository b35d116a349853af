"""The synthetic-pair cache codec: the generator version in the cache file name, and the
structure-preserving JSON encoding of the non-array parts of a pair (Lame parameters, meta)
stored inside the ``.npz``.

The cache key is ``v<GENERATOR_VERSION>-<first 10 hex of sha1(generator source files)>`` (the module's
file followed by those of its ``GENERATOR_DEPENDENCIES``): any edit of ``datasets/phantoms.py`` or
``datasets/elasticity.py`` (even a comment) gives new cache file names, so a changed generator never
reuses old phantoms.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np


def generator_version(module) -> str:
    parts = []
    for attr in ("GENERATOR_VERSION", "VERSION", "__version__"):
        value = getattr(module, attr, None)
        if value is not None:
            parts.append(str(value))
            break
    sources = [getattr(m, "__file__", None) for m in (module, *getattr(module, "GENERATOR_DEPENDENCIES", ()))]
    sources = [src for src in sources if src and os.path.isfile(src)]
    if sources:
        digest = hashlib.sha1()
        for src in sources:
            with open(src, "rb") as fh:
                digest.update(fh.read())
        parts.append(digest.hexdigest()[:10])
    version = "-".join(parts) if parts else "0"
    return "v" + re.sub(r"[^A-Za-z0-9.-]", "_", version)


def encode_value(value):
    """Structure-preserving JSON encoding (dict/tuple/list/ndarray/numpy scalars)."""
    if isinstance(value, dict):
        return {"d": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"t": [encode_value(v) for v in value]}
    if isinstance(value, list):
        return {"l": [encode_value(v) for v in value]}
    if isinstance(value, np.ndarray):
        return {"a": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode_value(value):
    if isinstance(value, dict):
        if "d" in value:
            return {decode_value(k): decode_value(v) for k, v in value["d"]}
        if "t" in value:
            return tuple(decode_value(v) for v in value["t"])
        if "l" in value:
            return [decode_value(v) for v in value["l"]]
        if "a" in value:
            return np.asarray(value["a"], dtype=value["dtype"])
    return value


def json_roundtrip(value):
    return decode_value(json.loads(json.dumps(encode_value(value))))
