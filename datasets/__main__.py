"""``python -m datasets check|make-labels`` (:mod:`datasets.commands`)."""
import sys

from .commands import main

sys.exit(main())
