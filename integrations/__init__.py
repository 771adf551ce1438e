"""Adapters of seqpar_ring to the ecosystem (installed as ``seqpar_ring.integrations``).

Each adapter lives in its own module and imports its framework (transformers, DeepSpeed,
accelerate) only when that module is imported, so ``import seqpar_ring`` never needs them.
"""
