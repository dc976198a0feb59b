import sys

from lesiongen.classify.train import main

sys.exit(main(sys.argv[1:]))
