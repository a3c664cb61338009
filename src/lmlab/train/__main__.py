"""``python -m lmlab.train CONFIG [key=value ...]``: the same as ``lmlab train``."""

import sys

from lmlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
