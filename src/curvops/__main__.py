"""``python -m curvops``: the ``curvops`` command line."""

import sys

from curvops.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
