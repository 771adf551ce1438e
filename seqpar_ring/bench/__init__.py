"""Benchmarks: ``python -m seqpar_ring.bench {ring,dilated,e2e} --help``.

Each prints a table, writes JSON and measures its reference in the same run. Launch multi-GPU
runs with torchrun (``torchrun --nproc_per_node 2 -m seqpar_ring.bench ring``).
"""
