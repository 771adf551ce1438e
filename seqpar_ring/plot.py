"""``python -m seqpar_ring.plot <run dir>``: entry point of seqpar_ring.tools.plot."""

import sys

from seqpar_ring.tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
