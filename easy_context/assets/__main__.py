"""``python -m easy_context.assets fetch [--dir DIR] [--deb PATH]`` (see :mod:`easy_context.assets.fetch`)."""

import sys

from .fetch import main

if __name__ == "__main__":
    sys.exit(main())
