import sys

from lesiongen.classify_eval import main

sys.exit(main(sys.argv[1:]))
