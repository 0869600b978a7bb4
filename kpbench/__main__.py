import sys

from kpbench.cli import entry

sys.exit(entry())
