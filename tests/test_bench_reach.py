"""``bench e2e`` reach flags: argument parsing and the pure helpers (no training runs here)."""

from __future__ import annotations

import pytest

from seqpar_ring.tools.bench import e2e, reach


def test_parse_reach_flags():
    a = e2e.build_parser().parse_args([
        "--impl", "seqpar", "--attention", "dilated", "--layout", "contiguous",
        "--segments", "2048", "1048576", "--rates", "1", "16", "--activation-offload", "both",
        "--tiled-mlp", "--find-max", "--find-limit", "1048576", "--host-mem-gib", "120",
        "--gpu-mem-gib", "141", "--host-reserve-gib", "6"])
    assert (a.activation_offload, a.tiled_mlp, a.find_max, a.find_limit) == ("both", True, True,
                                                                              2**20)
    assert (a.host_mem_gib, a.gpu_mem_gib, a.host_reserve_gib) == (120.0, 141.0, 6.0)
    d = e2e.build_parser().parse_args([])
    assert (d.activation_offload, d.tiled_mlp, d.host_mem_gib, d.gpu_mem_gib) == (
        "off", False, None, None)
    for bad in (["--activation-offload", "yes"], ["--offload"]):
        with pytest.raises(SystemExit):
            e2e.build_parser().parse_args(bad)


def test_round_for_schedule():
    segs = [2048, 8192, 32768, 131072, 1048576]
    assert reach.round_for_schedule(2**20, 2, segs) == 2**20
    assert reach.round_for_schedule(1_429_876, 2, segs) == 2**20   # multiple of the 1M segment
    assert reach.round_for_schedule(1_000_000, 4, segs) == 7 * 131072
    assert reach.round_for_schedule(1000, 4, segs) == 1000        # no segment fits: divisor only
    assert reach.round_for_schedule(3, 4, segs) == 0


def test_option_cost_lines():
    rows = [{"impl": "seqpar", "offload": "off", "attention": "recomputed", "seq_len": 8,
             "status": "ok", "tokens_per_s": 100.0, "peak_gib": 10.0},
            {"impl": "seqpar", "offload": "on", "attention": "recomputed", "seq_len": 8,
             "status": "ok", "tokens_per_s": 95.0, "peak_gib": 6.0},
            {"impl": "seqpar", "offload": "on", "attention": "recomputed", "seq_len": 16,
             "status": "ok", "tokens_per_s": 50.0, "peak_gib": 9.0},
            {"impl": "seqpar", "offload": "on", "attention": "kept", "seq_len": 16,
             "status": "ok", "tokens_per_s": 60.0, "peak_gib": 11.0},
            {"impl": "seqpar", "offload": "off", "attention": "kept", "seq_len": 32,
             "status": "ok", "tokens_per_s": 60.0, "peak_gib": 11.0}]  # no recomputed twin
    assert e2e.option_costs(rows) == [
        "activation offload at 8 tokens: 100 -> 95 tokens/s (-5.0%), peak GPU 10.0 -> 6.0 GiB",
        "kept attention at 16 tokens: 50 -> 60 tokens/s (+20.0%), peak GPU 9.0 -> 11.0 GiB"]
    a = e2e.build_parser().parse_args(["--recompute-attention", "both"])
    assert a.recompute_attention == "both"


def test_plan_options_follow_the_run():
    class Run:  # what plan_options reads from an engine wrapper
        world, layout = 2, "contiguous"

    a = e2e.build_parser().parse_args(["--attention", "dilated", "--rates", "1", "2",
                                       "--segments", "8", "16", "--activation-offload", "on",
                                       "--tiled-mlp"])
    a.impl_name, a.dtype = "seqpar", "bf16"
    dil, dense = reach.plan_options(Run, a), reach.plan_options(Run, a, attention="ring")
    assert (dil.attention, dil.layout, dil.dilation_rates) == ("dilated", "contiguous", (1, 2))
    assert (dense.attention, dense.layout, dense.dilation_rates) == ("ring", "zigzag", ())
    assert dil.activation_offload and dil.tiled_mlp and dil.reserve_gib == 0
    assert not reach.plan_options(Run, a, offload=False).activation_offload
    assert dil.ulysses_size == 1

    class Hybrid(Run):  # a seqpar engine run as Ulysses x ring
        world, ulysses = 4, 2

    assert reach.plan_options(Hybrid, a, attention="ring").ulysses_size == 2
    a.impl_name = "alst"  # the reach options are ours only
    alst = reach.plan_options(Run, a)
    assert not alst.activation_offload and not alst.tiled_mlp and alst.attention == "ring"
    assert reach.plan_options(Hybrid, a).ulysses_size == 1  # ALST: no Ulysses factor of ours
