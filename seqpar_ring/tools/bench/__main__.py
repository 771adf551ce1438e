"""``python -m seqpar_ring.tools.bench``: the same as ``python -m seqpar_ring.bench``."""

from seqpar_ring.tools.bench import main

if __name__ == "__main__":
    main()
