import sys

from dapo_mcore.plan.cli import main

sys.exit(main(sys.argv[1:]))
