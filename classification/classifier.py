import sys

from lesiongen.classify import main

sys.exit(main(sys.argv[1:]))
