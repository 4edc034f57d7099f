"""`python -m clipline ...`: the clipline CLI (so that torchrun/accelerate can launch it with -m)."""

import sys

from clipline.cli import main

if __name__ == "__main__":
    sys.exit(main([*sys.argv[1:]]))
