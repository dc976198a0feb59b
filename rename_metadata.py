"""Rename downloaded metadata CSVs to data/<dataset>/metadata.csv: see ``python rename_metadata.py -h``."""

import sys

from lesiongen.captions.rename_metadata import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
