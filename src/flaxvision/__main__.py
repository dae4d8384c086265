"""`python -m flaxvision ...` is the `flaxvision` command."""

import sys

from flaxvision.cli import main

if __name__ == "__main__":
    sys.exit(main())
