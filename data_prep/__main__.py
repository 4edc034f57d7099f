"""`python -m data_prep ...`: the same as `clipline prep ...`."""

import sys

from clipline.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", *sys.argv[1:]]))
