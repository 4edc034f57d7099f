"""`python -m training ...`: the same as `clipline train ...`."""

import sys

from clipline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
