import sys

from lesiongen.classify.compare import main

sys.exit(main(sys.argv[1:]))
