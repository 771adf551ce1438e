"""Tools around the library, apart from its core (ring, kernels, layout, groups, loss).

* ``bench/``: benchmarks (``python -m seqpar_ring.bench {ring,dilated,e2e}``);
* ``plan``: memory planner (``python -m seqpar_ring.plan``);
* ``plot``: curves of a fine-tuning run (``python -m seqpar_ring.plot <run dir>``);
* ``demo``: a two-rank CPU check against one process (``python -m seqpar_ring.demo``).

The core never imports from here. The ``python -m seqpar_ring.<tool>`` commands are thin
entry modules in the package root that call these modules' ``main``.
"""
