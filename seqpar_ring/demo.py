"""``python -m seqpar_ring.demo``: entry point of the two-rank check, seqpar_ring.tools.demo."""

import sys

from seqpar_ring.tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
