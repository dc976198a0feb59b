import sys

from lesiongen.classify.evaluate import main

sys.exit(main(sys.argv[1:]))
