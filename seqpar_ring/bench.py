"""``python -m seqpar_ring.bench <benchmark>``: entry point of seqpar_ring.tools.bench."""

from seqpar_ring.tools.bench import main

if __name__ == "__main__":
    main()
