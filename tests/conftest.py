"""Shared test setup: repo root on sys.path, shims before TensorFlow, quiet logs, seeds."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tf_compat  # noqa: E402,F401  (shims before TensorFlow: TF_USE_LEGACY_KERAS, getargspec)
