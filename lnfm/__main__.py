"""`python -m lnfm <job> ...`: see lnfm/cli.py."""

import sys

from lnfm.cli import main

if __name__ == "__main__":
    sys.exit(main())
