"""Build concept-rich captions and a split imagefolder dataset: see ``python build_captions.py -h``."""

import sys

from lesiongen.captions.build import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
