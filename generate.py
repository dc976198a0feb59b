"""Generate single images or a labelled synthetic dataset: see ``python generate.py -h``."""

import sys

from lesiongen.diffusion.generate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
