"""``python -m histotransfer.cli``: the command line (as the `histotransfer` console script)."""

import sys

from histotransfer.cli import main

if __name__ == "__main__":  # not when a tool imports every module
    sys.exit(main())
