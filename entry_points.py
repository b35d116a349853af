"""Console commands of ``pip install -e .`` (``pyproject.toml`` ``[project.scripts]``).

Each command runs one top-level script's ``main`` through ``cli.cli_main``, exactly as
``python <script>.py`` does: same options, one ``error:`` line and exit status 1 for a user
error, ``--debug`` for the traceback. (A script's ``main`` returns its output folder, which a
console wrapper would otherwise pass to ``sys.exit`` as an error message.) The scripts are
imported only when their command runs, so ``hm-register --help`` does not load the trainer.
"""
from __future__ import annotations

import importlib

from hypermorph_spatially_adaptive.cli import cli_main

#: console command -> top-level script module (its ``main(argv)`` is run)
COMMANDS = {
    "hm-pipeline": "run_pipeline",
    "hm-train-elastic-global": "train_hypermorph_elastic_global",
    "hm-train-elastic-sa": "train_hypermorph_elastic_sa",
    "hm-train-diffusion-global": "train_hypermorph_diffusion_global",
    "hm-train-diffusion-sa": "train_hypermorph_diffusion_sa",
    "hm-identify": "parameter_identification",
    "hm-infer": "inference",
    "hm-register": "register",
}


def _run(command: str) -> None:
    cli_main(importlib.import_module(COMMANDS[command]).main)


def pipeline() -> None:
    """``hm-pipeline``: ``run_pipeline.py``."""
    _run("hm-pipeline")


def train_elastic_global() -> None:
    """``hm-train-elastic-global``: ``train_hypermorph_elastic_global.py``."""
    _run("hm-train-elastic-global")


def train_elastic_sa() -> None:
    """``hm-train-elastic-sa``: ``train_hypermorph_elastic_sa.py``."""
    _run("hm-train-elastic-sa")


def train_diffusion_global() -> None:
    """``hm-train-diffusion-global``: ``train_hypermorph_diffusion_global.py``."""
    _run("hm-train-diffusion-global")


def train_diffusion_sa() -> None:
    """``hm-train-diffusion-sa``: ``train_hypermorph_diffusion_sa.py``."""
    _run("hm-train-diffusion-sa")


def identify() -> None:
    """``hm-identify``: ``parameter_identification.py``."""
    _run("hm-identify")


def infer() -> None:
    """``hm-infer``: ``inference.py``."""
    _run("hm-infer")


def register() -> None:
    """``hm-register``: ``register.py``."""
    _run("hm-register")
