"""Dataset options, declared once.

Every dataset class lists the options it takes in its ``OPTIONS`` attribute, as :class:`Option`
objects (an option several datasets share, like ``--ndim``, is one object defined here). From
that one declaration :mod:`datasets.cli` derives

* the command line (:func:`datasets.add_dataset_args`: ``--<key with hyphens>``),
* the JSON dict saved as ``config.json["data"]`` (:func:`datasets.dataset_options`; keys = the
  option keys = the dataset's keyword arguments, so ``get_dataset(**dict)`` rebuilds it), and
* the argv the pipeline passes on to the training scripts (:func:`datasets.dataset_argv`).

Standard library only.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional


@dataclass(frozen=True)
class Option:
    """One data option: ``key`` is the dataset keyword argument, the ``config.json["data"]`` key
    and (with ``_`` -> ``-``) the command-line flag. ``type``/``nargs``/``choices``/``metavar``/
    ``default`` are those of ``argparse``; ``path``: saved as an absolute path."""

    key: str
    help: str
    type: Optional[Callable[[str], Any]] = None
    nargs: Any = None
    default: Any = None
    choices: Optional[tuple] = None
    metavar: Any = None
    path: bool = False
    #: ``"store_false"``: a switch ``--no-<key>`` that sets ``False`` (absent: ``None``, the
    #: dataset's default); ``flag`` is then ``--no-<key with hyphens>``
    action: Optional[str] = None

    @property
    def flag(self) -> str:
        if self.action == "store_false":
            return "--no-" + self.key.replace("_", "-")
        return "--" + self.key.replace("_", "-")

    def add_to(self, group) -> None:
        """Add the argument to an ``argparse`` parser or argument group."""
        if self.action == "store_false":
            group.add_argument(self.flag, dest=self.key, action="store_false", default=None, help=self.help)
            return
        kwargs = {"default": self.default, "help": self.help}
        for name in ("type", "nargs", "choices", "metavar"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        group.add_argument(self.flag, **kwargs)

    def to_config(self, value):
        """The JSON value saved in ``config.json["data"]`` (``None``: not saved)."""
        if value is None:
            return None
        if self.path:
            return os.path.abspath(value)
        if isinstance(value, (list, tuple)):
            return list(value)
        return value

    def to_argv(self, value) -> List[str]:
        """Command-line tokens giving ``value`` (``[]`` for ``None``; a ``store_false`` switch:
        its flag for ``False``, nothing otherwise)."""
        if value is None:
            return []
        if self.action == "store_false":
            return [self.flag] if value is False else []
        if isinstance(value, (list, tuple)):
            return [self.flag, *[str(v) for v in value]]
        return [self.flag, str(value)]


def arg_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert`` for argparse: its ``ValueError`` becomes a usage error naming the problem."""

    def parse(text: str):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


#: an integer >= 1 / >= 0 (``ValueError`` naming the value otherwise)
positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def split_class_names(value) -> tuple:
    """Class names from ``"a,b,c"`` (or a sequence): stripped, none empty, none repeated
    (``ValueError`` naming the repeated names: two classes of one name would be confused in
    every table)."""
    names = [c.strip() for c in value.split(",")] if isinstance(value, str) else [str(c).strip() for c in value]
    if not names or any(not c for c in names):
        raise ValueError(f"class names must be non-empty and comma-separated, got {value!r}")
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ValueError(f"class names must differ, {', '.join(repeated)} is repeated in {value!r}")
    return tuple(names)


def _class_names_text(text: str) -> str:
    split_class_names(text)
    return text


_class_names_text.__name__ = "class names"


# ---- options several datasets share ------------------------------------------------------------
NDIM = Option("ndim", type=int, choices=(2, 3),
              help="2D or 3D (if not given: synthetic/nlst/acdc 2, l2r-lung 3, as in the paper text's "
                   "Table 1; folder: as the images)")
IMAGE_SIZE = Option("image_size", type=arg_type(positive_int), nargs="+",
                    help="synthetic image size, e.g. 64 64 (one value = cube; default 64 per axis); "
                         "ignored by the other datasets")
SLICE_AXIS = Option("slice_axis", type=int, choices=(0, 1, 2),
                    help="2D slices of 3D volumes: array axis to slice, at its middle index (if not given: "
                         "nlst/l2r-lung 1 = coronal, the authors' code's slice 96 / 64; folder 2)")

SPLIT_SCHEMES = ("authors", "ordered", "paper-text")
SPLIT_SCHEME = Option(
    "split_scheme", choices=SPLIT_SCHEMES,
    help="nlst/acdc/l2r-lung: which subjects go to train/val/test. 'authors' (default for all three): the "
         "subject lists of the authors' code (NLST test 0001-0030, val 0101-0110, train 0031-0100 + "
         "0200-0299; ACDC train training/001-100, val testing/101-120, test testing/121-150; LungCT train "
         "0001-0020, val 0021-0023, test 0024/0025/0028/0029); 'ordered': contiguous train/val/test blocks "
         "of the sorted pairs in the paper text's proportions (this project's earlier cut, and the only "
         "scheme of folder datasets); 'paper-text' (acdc only): the paper text's 50/20/30 of training/, "
         "10/4/6 per pathology group. See docs/paper_datasets.md")
TARGET_SPACING = Option(
    "target_spacing", type=float,
    help="acdc/l2r-lung: isotropic voxel size in mm the volumes are resampled to (if not given: acdc 1.8, "
         "l2r-lung 2.0, both the authors' code; the paper text says only 'isotropic')")

CLASS_NAMES = Option("class_names", type=arg_type(_class_names_text),
                     help="folder: comma-separated class names, all different (if not given: class1, class2, ...)")

#: options every dataset accepts (``get_dataset`` warns where the dataset fixes them)
ACCEPTED_BY_ALL = ("ndim", "image_size")
