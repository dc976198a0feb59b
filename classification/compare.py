import sys

from lesiongen.classify_compare import main

sys.exit(main(sys.argv[1:]))
