"""``python -m fastvis ...``: the same as the ``fastvis`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
