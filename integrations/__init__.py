"""Adapters of seqpar_ring to the ecosystem (installed as ``seqpar_ring.integrations``).

Each adapter lives in its own module and imports its framework (transformers, DeepSpeed,
accelerate) only when that module is imported, so ``import seqpar_ring`` never needs them.
"""

if __name__ != "seqpar_ring.integrations":
    # From the repository root, the folder is also visible as a top-level package; loading it
    # under that name would create a second copy of every adapter's state.
    raise ImportError(
        f"import the adapters as seqpar_ring.integrations (e.g. `from seqpar_ring.integrations "
        f"import hf`), not as {__name__!r}"
    )
