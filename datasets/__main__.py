"""``python -m datasets check|make-labels`` (:mod:`datasets.commands`)."""
import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
