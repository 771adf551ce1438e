"""The planner: memory, step time, best layouts, calibration and validation.

One public namespace for the modules it is made of (``python -m seqpar_ring.plan --help``):

* `plan_model`: a decoder's shapes (``ModelSpec``, ``PRESETS``, ``load_spec``), ``PlanOptions``;
* `plan_memory`: per-GPU (and host) bytes of one training step, the longest sequence;
* `plan_time`: seconds of one step and tokens/s, term by term (``step_time``, ``Links``);
* `plan_calib` / `plan_calibrate`: the measured figures the time model reads, and measuring them;
* `plan_validate`: the time model against every point measured on GPUs (``data/measured.json``);
* `plan_search`: the best layouts for a run and the fewest GPUs for a length;
* `plan_ulysses`: the ``ulysses_size="auto"`` rule;
* `plan_cli`: the command line.
"""

from seqpar_ring.tiled import default_tile_size  # noqa: F401 - used through this namespace

from .plan_calib import Calibration, load_calibration, save_calibration  # noqa: F401
from .plan_cli import (  # noqa: F401
    build_parser,
    format_plan,
    format_time,
    main,
    options_from_args,
    reach_table,
)
from .plan_memory import (  # noqa: F401
    Plan,
    _attention_backward,
    _attn_saved,
    _dilated_backward,
    _layer_saved,
    _mlp_saved,
    _tiled_mlp_work,
    attention_check_bytes,
    estimate,
    max_seq_len,
    reach,
)
from .plan_model import (  # noqa: F401
    DTYPE_BYTES,
    FALLBACK_GPU_MEM_GIB,
    GIB,
    PRESETS,
    ModelSpec,
    PlanOptions,
    dilated_schedule,
    gpu_memory_gib,
    load_spec,
    seq_divisor,
)
from .plan_search import best_layouts, fewest_gpus  # noqa: F401
from .plan_time import Links, StepTime, attention_pairs, step_time  # noqa: F401
from .plan_ulysses import (  # noqa: F401 - the planner's public names
    Hardware,
    choose_ulysses_size,
    format_choice,
    resolve_ulysses_size,
    ulysses_cost,
)

if __name__ == "__main__":
    main()
