"""The step-time model against every point measured on GPUs (``data/measured.json``).

``python -m seqpar_ring.plan --validate`` prints, per point, the figure predicted from the
calibration next to the one measured, and the error. Setups:

* ``attention``: one attention layer forward+backward (``shape``: heads, K/V heads, head dim)
  over ``gpus`` ranks as the benchmark ran it (zigzag ring, or one GPU); figures in useful
  TFLOP/s per GPU (4·S²·H·d/2 forward x 3.5, per GPU; documents: their causal squares) or
  seconds;
* ``e2e``: a DeepSpeed ZeRO-3 training step (``bench e2e``: bf16, checkpointing, tiled loss),
  tokens/s over all GPUs;
* ``fwd+bwd``: forward + backward of the model without DeepSpeed and with transformers' loss
  on full logits (``bench packed``), tokens/s;
* ``layer``: one decoder layer forward+backward, no checkpointing, seconds.

A point with ``calibrates`` set was used to choose that calibration value: it is shown, marked,
and not an independent check.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from .plan_calib import DATA, Calibration
from .plan_model import PRESETS, ModelSpec, PlanOptions
from .plan_time import Links, attention_pairs, step_time

MEASURED = os.path.join(DATA, "measured.json")
GOAL = 0.15


@dataclass
class Check:
    point: dict
    predicted: float

    @property
    def error(self) -> float:
        return self.predicted / self.point["figure"] - 1.0


def load_points(path: str = MEASURED) -> list[dict]:
    with open(path) as f:
        return json.load(f)["points"]


def _options(p: dict) -> PlanOptions:
    opts = dict(p.get("options", {}))
    for key in ("segment_lengths", "dilation_rates"):
        if key in opts:
            opts[key] = tuple(opts[key])
    docs = p.get("doc_lens")
    if docs:  # the same causal squares: documents of sum(L^2) / sum(L) tokens
        opts["doc_len"] = round(sum(n * n for n in docs) / sum(docs))
    dilated = opts.get("attention") == "dilated"
    return PlanOptions(gpus=p["gpus"], layout="contiguous" if dilated else "zigzag", **opts)


def predict(p: dict, c: Calibration, links: Links = Links()) -> float:
    """The model's figure for point ``p``, in the point's unit."""
    o = _options(p)
    setup, seq = p["setup"], p["seq_len"]
    if setup == "attention":
        s = p["shape"]
        m = ModelSpec(s["heads"] * s["head_dim"], 1, s["heads"], s["kv_heads"], 1, 1,
                      s["head_dim"])
        st = step_time(m, seq, replace(o, checkpointing=False, zero=0), c, links)
        sec = st.of("attention")
        if p["unit"] == "s":
            return sec
        useful = 3.5 * 4 * s["head_dim"] * s["heads"] * attention_pairs(seq, o) / p["gpus"]
        return useful / sec / 1e12
    m = PRESETS[p["model"]]
    if setup == "e2e":
        return step_time(m, seq, o, c, links).tokens_per_s
    layer = setup == "layer"
    if layer:
        m = replace(m, layers=1)
    o = replace(o, zero=0, tiled_loss=False, checkpointing=not layer)
    st = step_time(m, seq, o, c, links)
    sec = sum(s for n, s, _ in st.terms
              if n in ("matmuls", "elementwise", "attention") or (n == "loss" and not layer))
    return sec if p["unit"] == "s" else seq / sec


def validate(c: Calibration, points: list[dict] | None = None) -> list[Check]:
    return [Check(p, predict(p, c)) for p in (points or load_points())]


def format_checks(checks: list[Check]) -> str:
    rows = [f"{'point':<72} {'date':<10} {'measured':>10} {'predicted':>10} {'error':>7}"]
    for ch in checks:
        p = ch.point
        unit = {"tokens/s": "tok/s", "TFLOP/s per GPU": "TFLOP/s"}.get(p["unit"], p["unit"])
        mark = (" (calibrates " + p["calibrates"] + ")" if p.get("calibrates") else
                "  OUTSIDE 15%" if abs(ch.error) > GOAL else "")
        fig = f"{p['figure']:,.4g}" if p["figure"] < 1000 else f"{p['figure']:,.0f}"
        pre = f"{ch.predicted:,.4g}" if ch.predicted < 1000 else f"{ch.predicted:,.0f}"
        rows.append(f"{p['name'][:72]:<72} {p['date']:<10} {fig:>10} {pre:>10} "
                    f"{ch.error:>+7.1%} {unit}{mark}")
    indep = [ch for ch in checks if not ch.point.get("calibrates")]
    worst = max(indep, key=lambda ch: abs(ch.error), default=None)
    if worst is not None:
        inside = sum(abs(ch.error) <= GOAL for ch in indep)
        rows.append(f"{inside} of {len(indep)} independent points within {GOAL:.0%}; largest "
                    f"error {worst.error:+.1%} ({worst.point['name']}, {worst.point['date']})")
    return "\n".join(rows)
