"""``python -m seqpar_ring.plan``: entry point of the memory planner, seqpar_ring.tools.plan."""

from seqpar_ring.tools.plan import main

if __name__ == "__main__":
    main()
