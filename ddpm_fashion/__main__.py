"""`python -m ddpm_fashion`: the same command line as the `ddpm-fashion` console script."""

import sys

from ddpm_fashion.cli import main

if __name__ == "__main__":
    sys.exit(main())
