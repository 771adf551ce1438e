"""Calibration of the step-time model: what one GPU and its links do, read from a small JSON.

``python -m seqpar_ring.plan --calibrate`` measures the machine it runs on and writes such a
file (`plan_calibrate`); ``--calib FILE`` makes the planner read it. Without one the shipped
H200 figures are used (``data/calib_h200.json``): every value there names its source in
``sources`` — measured on H200s (machine, date, command), derived from such measurements, or
fitted / assumed, said so. Throughputs are per GPU; bandwidths per direction.

Attention throughput is a table of useful TFLOP/s of a causal forward+backward (4·S²·H·d/2
forward, x 3.5 with backward) by head dimension and call length L (tokens of one kernel
call). Between measured lengths it is interpolated in log L, outside them held at the end
value. A head dimension with fewer than two points follows the curve of the best-measured
dimension, scaled through its own points (e.g. d = 64 from one point at 1M tokens).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_CALIB = os.path.join(DATA, "calib_h200.json")


@dataclass(frozen=True)
class Calibration:
    device: str
    matmul_tflops: float                         # bf16 GEMM, large shapes
    attention_tflops: dict[int, dict[int, float]]  # head_dim -> call length -> TFLOP/s
    dilated_efficiency: float                    # dilated useful TFLOP/s / dense, same length
    copy_tbps: float                             # device memory, bytes read + written per s
    host_gbps: float                             # pinned host <-> device, per direction
    p2p_gbps: float                              # GPU <-> GPU inside a node, per direction
    p2p_latency_s: float                         # fixed cost of one message
    alltoall_gbps: float                         # per GPU, inside a node
    ring_hop_s: float                            # fixed cost of one ring step (sync, merge)
    zero3_layer_s: float                         # per-step ZeRO-3 cost per decoder layer
    cpu_adam_params_per_s: float                 # ZeRO-Offload optimizer step, per rank
    sources: dict[str, str] = field(default_factory=dict)

    def attention(self, head_dim: int, length: float) -> float:
        """Useful TFLOP/s of one causal fwd+bwd call of ``length`` tokens at ``head_dim``."""
        table = self.attention_tflops
        best = max(table, key=lambda d: (len(table[d]), -abs(d - head_dim)))
        own = table.get(head_dim, {})
        if len(own) >= 2:
            return _interp(own, length)
        curve = table[best]
        if not own:
            return _interp(curve, length)
        ratio = math.exp(sum(math.log(v / _interp(curve, n)) for n, v in own.items()) / len(own))
        return ratio * _interp(curve, length)

    def to_json(self) -> dict:
        d = asdict(self)
        d["attention_tflops"] = {str(h): {str(n): v for n, v in sorted(c.items())}
                                 for h, c in sorted(self.attention_tflops.items())}
        return d

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        d = dict(d)
        d["attention_tflops"] = {int(h): {int(n): float(v) for n, v in c.items()}
                                 for h, c in d["attention_tflops"].items()}
        known = set(cls.__dataclass_fields__)
        missing = known - set(d) - {"sources"}
        if missing:
            raise ValueError(f"calibration lacks {sorted(missing)}: rerun "
                             "`python -m seqpar_ring.plan --calibrate` or start from the "
                             "shipped data/calib_h200.json")
        return cls(**{k: v for k, v in d.items() if k in known})


def _interp(curve: dict[int, float], length: float) -> float:
    pts = sorted(curve.items())
    if length <= pts[0][0]:
        return pts[0][1]
    for (n0, v0), (n1, v1) in zip(pts, pts[1:]):
        if length <= n1:
            f = math.log(length / n0) / math.log(n1 / n0)
            return v0 + f * (v1 - v0)
    return pts[-1][1]


def load_calibration(path: str | None = None) -> Calibration:
    """The calibration at ``path``, or the shipped H200 one."""
    with open(path or DEFAULT_CALIB) as f:
        return Calibration.from_json(json.load(f))


def save_calibration(c: Calibration, path: str) -> None:
    with open(path, "w") as f:
        json.dump(c.to_json(), f, indent=1)
        f.write("\n")
