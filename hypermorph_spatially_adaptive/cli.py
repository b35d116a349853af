"""Command-line helpers shared by the scripts: the ``__main__`` entry and argparse value checks.

:func:`cli_main` is the ``if __name__ == "__main__":`` entry of every script: a user error
(bad option, missing or unreadable file, refused run folder) prints one ``error: ...`` line
and exits with status 1; ``--debug`` shows the traceback instead. ``arg_*`` are argparse
``type`` checks with clear messages; :func:`add_refine_args` adds the refinement options from
:class:`.configs.RefineConfig`.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from typing import Callable, Optional, Sequence

from .configs import RefineConfig

#: exceptions that mean "the input is wrong", reported as one ``error:`` line by :func:`cli_main`
USER_ERRORS = (ValueError, OSError, FloatingPointError, KeyError)


def cli_main(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    """Run a script's ``main(argv)`` for the command line.

    A user error (:data:`USER_ERRORS`: bad value, missing/unreadable file, refused run folder)
    prints one line ``error: <message>`` to stderr and exits with status 1; with ``--debug``
    anywhere in the arguments (removed before ``main`` sees them) the traceback is shown
    instead. Other exceptions (bugs) always show their traceback. Ctrl-C exits with 130.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        main(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as exc:
        if debug:
            raise
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        msg = " ".join(msg.split()) or type(exc).__name__
        print(f"error: {msg} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)


# ---- argparse value checks (shared by the scripts) -------------------------------------------
def arg_int(minimum: int, odd: bool = False) -> Callable[[str], int]:
    """argparse ``type``: an integer >= ``minimum`` (and odd with ``odd``), else a clear error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if odd and value % 2 == 0:
            raise argparse.ArgumentTypeError(f"must be odd (a window centred on its voxel), got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def arg_float(minimum: float = 0.0, maximum: Optional[float] = None, inclusive: bool = False) -> Callable[[str], float]:
    """argparse ``type``: a finite float > ``minimum`` (>= with ``inclusive``), <= ``maximum``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value >= minimum if inclusive else value > minimum
        if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
            rng = f"{'>=' if inclusive else '>'} {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def arg_argv(text: str) -> str:
    """argparse ``type`` of an option holding other options as one string (``--train-args``):
    the text is returned unchanged once ``shlex.split`` can split it (balanced quotes)."""
    try:
        shlex.split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"cannot split {text!r} into options ({exc}); balance the quotes "
                                         "inside it") from None
    return text


arg_argv.__name__ = "options"


# ---- refinement options (inference.py, run_pipeline.py, register.py) -----------------------------
def _arg_level(text: str):
    """argparse ``type`` of ``--refine-levels``: an integer >= 1, or ``off``."""
    if text.strip().lower() == "off":
        return "off"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer shrink factor or 'off', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"shrink factors must be >= 1, got {value}")
    return value


_arg_level.__name__ = "shrink factor"


def add_refine_args(group) -> None:
    """Add ``--refine-fold-weight``, ``--refine-logj-weight``, ``--refine-smooth``,
    ``--refine-grid``, ``--refine-scale``, ``--refine-levels``, ``--refine-level-split`` and
    ``--refine-svf`` to an argparse parser or group, each with the default of its
    :class:`.configs.RefineConfig` field (parse them back with ``RefineConfig.from_args``)."""
    default = RefineConfig()

    group.add_argument("--refine-fold-weight", type=arg_float(0.0, inclusive=True),
                       default=default.fold_weight,
                       help="refinement: weight of the folding penalty mean(relu(0.1 - det(I + grad u))^2) "
                            "added to the training loss (0: off, the original refinement, which folds)")
    group.add_argument("--refine-logj-weight", type=arg_float(0.0, inclusive=True),
                       default=default.logj_weight,
                       help="refinement: weight of the log-Jacobian penalty mean(log(max(det(I + grad u), 0.1))^2) "
                            "added to the training loss (keeps the local volume change, SDlogJ, near the "
                            "network's; 0: off)")
    group.add_argument("--refine-smooth", type=arg_int(0), default=default.smooth,
                       help="refinement: successive 3-voxel box filters applied to the update each step (0: off)")
    group.add_argument("--refine-grid", type=arg_int(1), default=default.grid,
                       help="refinement: the update lives on a grid this many times coarser per axis, "
                            "upsampled linearly (1: the image grid)")
    group.add_argument("--refine-scale", type=arg_int(0), default=default.scale,
                       help="refinement: evaluate the objective on images this many times coarser per axis (block "
                            "means) and upsample the update; 1: full resolution; 0 (auto): the largest power of two "
                            "that leaves >= 64 voxels per axis (1 at 64^2, 2 at 128^2: ~4x faster, no Dice lost there; "
                            "at 64^2 a factor 2 lost 0.02-0.05 Dice). Image sizes must be divisible by it. Only with "
                            "--refine-levels off")
    default_levels = default.levels
    group.add_argument("--refine-levels", type=_arg_level, nargs="+",
                       default=None if default_levels is None else list(default_levels), metavar="FACTOR",
                       help="refinement: a coarse-to-fine pyramid of shrink factors (e.g. 4 2 1, as ANTs' "
                            "antsRegistrationSyN shrink factors and ConvexAdam's coarse-then-fine optimization; "
                            "this project's addition, not the paper's): the --refine steps are split over the levels "
                            "(--refine-level-split) and each level refines the previous level's field on images that "
                            "many times coarser, with the same penalties, smoothing and update grid; every factor must "
                            "divide every image size (default 4 2 1: at the same steps it beat the single level on the "
                            "stress pairs, docs/peer_and_refinement.md). 'off': one level, --refine-scale")
    group.add_argument("--refine-level-split", type=arg_float(0.0, inclusive=True), nargs="+",
                       default=default.level_split, metavar="WEIGHT",
                       help="refinement: relative share of the --refine steps per --refine-levels level (one weight "
                            "per level; unset: equal shares, the remainder to the finest level)")
    group.add_argument("--refine-svf", action=argparse.BooleanOptionalAction, default=default.svf,
                       help="refinement: optimize a stationary velocity field, integrate it (scaling and squaring) "
                            "and compose it with the network's map (diffeomorphic by construction)")
