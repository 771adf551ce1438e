"""Step-time planner: arithmetic by hand, monotonicity, calibration round trip, validation."""

import json
import math
from dataclasses import replace

import pytest

from seqpar_ring.tools import plan as P
from seqpar_ring.tools.plan_calib import Calibration, load_calibration
from seqpar_ring.tools.plan_search import layout_candidates
from seqpar_ring.tools.plan_validate import GOAL, load_points, validate

TINY = P.PRESETS["tiny"]  # h 64, 2 layers, 4 heads, 2 kv, d 16, I 128, V 256


def flat(**kw) -> Calibration:
    """Round numbers: 1 TFLOP/s everywhere, 1 TB/s copies, 1 GB/s links, no fixed costs."""
    c = dict(device="test", matmul_tflops=1.0, attention_tflops={16: {1: 1.0}},
             dilated_efficiency=0.5, copy_tbps=1.0, host_gbps=1.0, p2p_gbps=1.0,
             p2p_latency_s=0.0, alltoall_gbps=1.0, ring_hop_s=0.0, zero3_layer_s=0.0,
             cpu_adam_params_per_s=1e9)
    c.update(kw)
    return Calibration(**c)


def test_attention_pairs_by_hand_and_brute_force():
    o = P.PlanOptions()
    assert P.attention_pairs(8, o) == 36                               # 1 + 2 + ... + 8
    assert P.attention_pairs(8, replace(o, window=3)) == 1 + 2 + 3 * 6   # min(i + 1, 3)
    assert P.attention_pairs(8, replace(o, window=8)) == 36
    assert P.attention_pairs(8, replace(o, doc_len=4)) == 2 * 10        # two causal squares
    dil = replace(o, attention="dilated", dilation_rates=(1, 2), segment_lengths=(4, 8))
    assert P.attention_pairs(8, dil) == 2 * 10 + 1 * (4 * 5 / 2)       # rate 2: 4 rows of 8
    for s, w in ((100, 7), (64, 64), (50, 80)):
        brute = sum(min(i + 1, w) for i in range(s))
        assert P.attention_pairs(s, replace(o, window=w)) == brute
    # the measured schedule: w = 2K..128K then the row, r = 1..16; FLOP ratio 28.4 at 256K
    sched = replace(o, attention="dilated", dilation_rates=(1, 2, 4, 8, 16))
    assert P.dilated_schedule(sched, 262144)[0] == (2048, 8192, 32768, 131072, 262144)
    assert 262144**2 / 2 / P.attention_pairs(262144, sched) == pytest.approx(28.44, abs=0.01)


def test_one_gpu_step_by_hand():
    c, s = flat(), 1024
    o = P.PlanOptions(gpus=1, zero=0)
    st = P.step_time(TINY, s, o, c)
    proj, mlp = 64 * 16 * (2 * 4 + 2 * 2), 3 * 64 * 128            # 12288, 24576
    assert st.of("matmuls") == pytest.approx(2 * s * 2 * (proj + mlp) * 4 / 1e12)
    assert st.of("elementwise") == pytest.approx(2 * s * (64 * 64 + 5 * 128) * 2 * 4 / 1e12)
    fwd = 4 * 16 * 4 * (s * (s + 1) / 2) / 1e12                     # per layer, 1 TFLOP/s
    assert st.of("attention") == pytest.approx(2 * (2 * fwd + 2.5 * fwd))  # fwd, recompute, bwd
    head = s * 2 * 64 * 256 * 4 / 1e12 + s * 256 * (2 * 2 + 12) * 2 / 1e12
    assert st.of("loss") == pytest.approx(head)
    assert st.of("optimizer") == pytest.approx(TINY.params() * 32 / 1e12)
    assert st.tokens_per_s == pytest.approx(s / st.seconds)
    kept = P.step_time(TINY, s, replace(o, keep_attention=True), c)  # no recomputed forward
    assert kept.of("attention") == pytest.approx(2 * (fwd + 2.5 * fwd))
    tiled = P.step_time(TINY, s, replace(o, tiled_mlp=True), c)
    assert tiled.of("matmuls") - st.of("matmuls") == pytest.approx(2 * s * 4 * 64 * 128 / 1e12)
    dil = replace(o, attention="dilated", dilation_rates=(1, 2), segment_lengths=(256, 1024))
    pairs = 4 * 256 * 257 / 2 + 512 * 513 / 2
    assert P.step_time(TINY, s, dil, c).of("attention") == pytest.approx(
        2 * 4.5 * 4 * 16 * 4 * pairs / 0.5e12)                      # at dilated_efficiency


def test_ring_hops_by_hand_compute_and_transfer_bound():
    s, o = 4096, P.PlanOptions(gpus=2, zero=0, checkpointing=False)
    kv = s / 2 * 2 * 16                                              # rank's K elements (2 kv)
    fwd = 4 * 16 * 4 * (s * (s + 1) / 2) / 2                          # FLOPs per GPU
    # compute-bound (1 TFLOP/s, 1 TB/s links): hop = compute, + the dK/dV return + hop costs
    c = flat(p2p_gbps=1000.0, ring_hop_s=0.001)
    f, b = fwd / 1e12, 2.5 * fwd / 1e12
    back = 8 * kv / 1e12
    want = (f / 2 + (f / 2 + 0.001)) + (b / 2 + (b / 2 + 0.001) + back + 0.001)
    assert P.step_time(TINY, s, o, c).of("attention") == pytest.approx(2 * want)
    # transfer-bound (fast kernel, 1 GB/s): a forward hop costs its 2·b·kv bytes
    c = flat(attention_tflops={16: {1: 1e6}})
    f, b = fwd / 1e18, 2.5 * fwd / 1e18
    want = (f / 2 + 4 * kv / 1e9) + (b / 2 + 12 * kv / 1e9 + 8 * kv / 1e9)
    st = P.step_time(TINY, s, o, c)
    assert st.of("attention") == pytest.approx(2 * want)
    assert any("transfer-bound" in n for n in st.notes)
    # across nodes (1 GPU per node) the hop takes the fabric's bandwidth instead
    slow = P.step_time(TINY, s, o, c, P.Links(gpus_per_node=1, inter_gbps=0.5))
    assert slow.of("attention") == pytest.approx(2 * (want + (4 + 12 + 8) * kv / 1e9))


def test_ulysses_all_to_all_by_hand():
    s, c = 4096, flat()
    o = P.PlanOptions(gpus=2, zero=0, ulysses_size=2)
    st = P.step_time(TINY, s, o, c)
    elems = s / 2 * (2 * 4 + 2 * math.lcm(2, 2)) * 16 / 2
    assert st.of("all-to-all") == pytest.approx(2 * 3 * elems * 2 / 1e9)   # fwd, recompute, bwd
    # u = 2 leaves r = 1: the whole row is one call, no ring term
    assert st.of("attention") == pytest.approx(2 * 4.5 * 4 * 16 * 4 * s * (s + 1) / 2 / 2 / 1e12)


def _steps(links_list, m, s, o, c):
    return [P.step_time(m, s, o, c, links).seconds for links in links_list]


@pytest.mark.parametrize("model", ["llama-1.1b", "llama-8b"])
def test_monotone_memory_and_links(model):
    m, c = P.PRESETS[model], load_calibration()
    for base in (P.PlanOptions(), P.PlanOptions(activation_offload=True, tiled_mlp=True),
                 P.PlanOptions(attention="dilated", dilation_rates=(1, 2, 4), layout="contiguous")):
        peaks = [P.estimate(m, 2**20, replace(base, gpus=g)).peak_bytes for g in (1, 2, 4, 8, 16)]
        assert all(a >= b for a, b in zip(peaks, peaks[1:])), peaks
    for gpus, u in ((16, 1), (16, 2), (64, 8), (4, 4)):
        o = P.PlanOptions(gpus=gpus, ulysses_size=u, activation_offload=True)
        for s in (2**16, 2**20):
            inter = _steps([P.Links(inter_gbps=g) for g in (1, 10, 50, 400)], m, s, o, c)
            intra = _steps([P.Links(intra_gbps=g) for g in (10, 100, 900)], m, s, o, c)
            host = _steps([P.Links(host_gbps=g) for g in (0.1, 5, 50)], m, s, o, c)
            for seq in (inter, intra, host):
                assert all(a >= b for a, b in zip(seq, seq[1:])), seq


def test_calibration_interpolation():
    c = load_calibration()
    assert c.attention(128, 65536) == 577.0 and c.attention(128, 2**22) == 528.8  # held
    assert 557.0 < c.attention(128, 32768) < 577.0
    assert c.attention(64, 2**20) == pytest.approx(402.0)          # its one point
    assert c.attention(64, 65536) == pytest.approx(577.0 * 402.0 / 528.8)
    assert all(k in c.sources for k in ("matmul_tflops", "host_gbps", "ring_hop_s"))
    assert "ASSUMED" in c.sources["host_gbps"] and "FITTED" in c.sources["ring_hop_s"]


def test_calibrate_on_cpu_round_trip(tmp_path, capsys):
    out = tmp_path / "calib.json"
    P.main(["--calibrate", "--quick", "--calib-out", str(out)])
    c = P.load_calibration(str(out))
    assert c == Calibration.from_json(json.loads(out.read_text()))
    assert c.device.startswith("CPU") and c.matmul_tflops > 0 and c.copy_tbps > 0
    assert sorted(c.attention_tflops) == [64, 128] and c.dilated_efficiency > 0
    assert "measured by `plan --calibrate` on CPU" in c.sources["matmul_tflops"]
    assert c.sources["ring_hop_s"].startswith("kept from the shipped H200")
    P.save_calibration(c, str(tmp_path / "again.json"))
    assert P.load_calibration(str(tmp_path / "again.json")) == c
    P.main(["--model", "tiny", "--seq-len", "2048", "--gpus", "2", "--gpu-mem-gib", "1",
            "--calib", str(out)])
    assert "step time (modelled)" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"device": "x", "attention_tflops": {}}))
    with pytest.raises(ValueError, match="calibrate"):
        P.load_calibration(str(bad))


def test_every_measured_point_within_goal(capsys):
    points = load_points()
    for p in points:
        assert {"name", "machine", "date", "command", "figure", "unit", "setup"} <= set(p)
    checks = validate(load_calibration(), points)
    outside = [(ch.point["name"], round(ch.error, 3)) for ch in checks
               if not ch.point.get("calibrates") and abs(ch.error) > GOAL]
    assert not outside
    n = sum(not ch.point.get("calibrates") for ch in checks)
    assert n >= 30
    P.main(["--validate"])
    out = capsys.readouterr().out
    assert f"{n} of {n} independent points within 15%" in out and "(calibrates" in out


def test_best_layouts_and_reasons():
    m, c = P.PRESETS["llama-8b"], load_calibration()
    best, losers, skipped = P.best_layouts(m, 2**20, P.PlanOptions(gpus=8), c, P.Links(),
                                           141.0, 128.0)
    assert best and all(x.fits for x in best)
    tps = [x.time.tokens_per_s for x in best]
    assert tps == sorted(tps, reverse=True)
    assert all(x.time.tokens_per_s <= tps[0] for x, _ in losers)
    reasons = dict(((x.options.sp_size, x.options.ulysses_size), why) for x, why in losers)
    assert reasons[(1, 1)].startswith("does not fit")
    assert not skipped  # 32 heads: every u up to 8 divides them
    for x, why in losers:
        assert why.startswith("does not fit") or "tokens/s" in why


def test_best_layouts_weigh_kept_attention():
    """Kept attention is a candidate only under checkpointing; it wins where it fits (no
    recomputed forward) and loses where its memory does not."""
    m, c = P.PRESETS["llama-8b"], load_calibration()
    cands, _ = layout_candidates(m, 2**20, P.PlanOptions(gpus=8), c, P.Links(), 141.0, 128.0)
    pairs = {}
    for x in cands:
        o = x.options
        pairs.setdefault((o.sp_size, o.ulysses_size, o.activation_offload, o.tiled_mlp),
                         {})[o.keep_attention] = x
    assert all(set(v) == {False, True} for v in pairs.values())
    for v in pairs.values():
        assert v[True].time.tokens_per_s > v[False].time.tokens_per_s
        assert v[True].plan.peak_bytes > v[False].plan.peak_bytes
    best, _, _ = P.best_layouts(m, 2**20, P.PlanOptions(gpus=8), c, P.Links(), 141.0, 128.0)
    assert best[0].options.keep_attention and "kept attention" in best[0].label
    # GPU memory between the least any layout needs and the least a kept layout needs
    least = {keep: min(x.plan.peak_gib + x.options.reserve_gib for x in cands
                       if x.options.keep_attention == keep) for keep in (False, True)}
    assert least[False] < least[True]
    tight, _, _ = P.best_layouts(m, 2**20, P.PlanOptions(gpus=8), c, P.Links(),
                                 (least[False] + least[True]) / 2, 128.0)
    assert tight and not any(x.options.keep_attention for x in tight)
    off, _ = layout_candidates(m, 2**20, P.PlanOptions(gpus=8, checkpointing=False), c,
                               P.Links(), 141.0, 128.0)
    assert off and not any(x.options.keep_attention for x in off)


def test_fewest_gpus_for_a_billion_tokens(capsys):
    m, c = P.PRESETS["llama-8b"], load_calibration()
    o = P.PlanOptions()
    x = P.fewest_gpus(m, 2**30, o, c, P.Links(), 141.0, 128.0)
    g = x.options.gpus
    assert x.fits and g & (g - 1) == 0 and x.options.sp_size == g
    half = replace(o, gpus=g // 2, sp=g // 2, activation_offload=True, tiled_mlp=True)
    pl = P.estimate(m, 2**30, half)
    assert pl.peak_gib > 140 or pl.host_gib > 128                  # half as many do not fit
    P.main(["--model", "llama-8b", "--billion", "--gpu-mem-gib", "141"])
    out = capsys.readouterr().out
    assert f"dense: {g:,} GPUs" in out and "dilated" in out


def test_window_and_documents_are_cheaper_than_dense():
    m, c = P.PRESETS["llama-1.1b"], load_calibration()
    o = P.PlanOptions(gpus=8)
    dense = P.step_time(m, 2**20, o, c).seconds
    assert P.step_time(m, 2**20, replace(o, window=4096), c).seconds < dense / 5
    assert P.step_time(m, 2**20, replace(o, window=2**20), c).seconds == pytest.approx(dense)
    assert P.step_time(m, 2**20, replace(o, doc_len=8192), c).seconds < dense / 5


def test_help_documents_time_options(capsys):
    with pytest.raises(SystemExit):
        P.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--calibrate", "--calib", "--validate", "--best", "--billion", "--window",
                 "--inter-gbps", "--nodes", "step time"):
        assert flag in out


def test_readme_worked_example_matches_the_planner():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    doc = open(os.path.join(root, "docs", "planner.md")).read()
    m, c = P.PRESETS["llama-8b"], load_calibration()
    for gpus in (8, 64):
        best, _, _ = P.best_layouts(m, 2**20, P.PlanOptions(gpus=gpus), c, P.Links(), 141.0,
                                    128.0)
        figure = f"{best[0].time.tokens_per_s:,.0f}"
        assert f"| {figure} |" in readme and figure in doc
    x = P.fewest_gpus(m, 2**30, P.PlanOptions(), c, P.Links(), 141.0, 128.0)
    assert f"need {x.options.gpus:,} H200s" in readme
    assert f"{x.time.seconds:,.0f} s" in doc


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_calibrate_on_a_gpu(tmp_path):
    """The full measurement (the GPU path, not yet run): sane ranges, and a file that loads."""
    from seqpar_ring.tools.plan_calibrate import calibrate

    c = calibrate()
    P.save_calibration(c, str(tmp_path / "gpu.json"))
    assert P.load_calibration(str(tmp_path / "gpu.json")) == c
    assert c.matmul_tflops > 50 and c.copy_tbps > 0.5 and c.host_gbps > 2
    assert c.attention(128, 65536) > 50 and c.attention(64, 65536) > 20
    assert 0.05 < c.dilated_efficiency < 2
    print(c.to_json())
