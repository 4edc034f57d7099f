"""`python -m eval ...`: the same as `clipline eval ...`."""

import sys

from clipline.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
