"""Planner terms against hand-computed numbers on known configs."""

import json

import pytest

from seqpar_ring.tools import plan as P

GIB = 2**30


def test_param_counts_match_published_models():
    # TinyLlama-1.1B, Llama-2-7B, Llama-3-8B parameter counts as published
    assert P.PRESETS["llama-1.1b"].params() == 1_100_048_384
    assert P.PRESETS["llama-7b"].params() == 6_738_415_616
    assert P.PRESETS["llama-8b"].params() == 8_030_261_248


def test_static_terms_by_zero_stage():
    m = P.PRESETS["llama-1.1b"]
    n = 1_100_048_384
    pl = P.estimate(m, 4096, P.PlanOptions(gpus=2, zero=3))
    assert pl.gib("weights") == pytest.approx(n * 2 / 2 / GIB)
    assert pl.gib("grads") == pytest.approx(n * 2 / 2 / GIB)
    assert pl.gib("optimizer") == pytest.approx(n * 12 / 2 / GIB)  # fp32 master + Adam m, v
    assert pl.gib("zero3 gathered params") == pytest.approx((32000 * 2048 + 5e7) * 2 / GIB)
    pl1 = P.estimate(m, 4096, P.PlanOptions(gpus=2, zero=1))
    assert pl1.gib("weights") == pytest.approx(n * 2 / GIB)
    assert pl1.gib("grads") == pytest.approx(n * 2 / GIB)
    assert pl1.gib("optimizer") == pytest.approx(n * 12 / 2 / GIB)
    off = P.estimate(m, 4096, P.PlanOptions(gpus=2, offload_optimizer=True))
    assert off.gib("optimizer") == 0


def test_activation_terms_tiny_by_hand():
    m = P.PRESETS["tiny"]  # h 64, 2 layers, 4 heads, 2 kv, d 16, I 128, V 256
    # attention half: norm 64*6+4=388, rotated q/k + v 8*16*2=256, out+lse 4*16*2+4*4=144,
    # o_proj input 128 (RoPE keeps the shared cos/sin, nothing per token); MLP half: norm 388,
    # gate/up/silu/product 4*128*2=1024
    assert P._attn_saved(m, 2) == 388 + 256 + 144 + 128
    assert P._mlp_saved(m, 2) == 388 + 1024
    assert P._layer_saved(m, 2) == 916 + 1412
    # ring backward, zigzag: dq+delta 4*16*4+16=272, dkv 2*2*2*16*4=512, K/V bufs 2*2*2*16*2=256,
    # block grads (3 + 2 expanded) * 4*16*2 * 0.5 = 320; contiguous: block grads 640
    o = P.PlanOptions(gpus=2)
    assert P._attention_backward(m, 2, o) == 272 + 512 + 256 + 320
    contiguous = P.PlanOptions(gpus=2, layout="contiguous")
    assert P._attention_backward(m, 2, contiguous) == 272 + 512 + 256 + 640
    t = 1024
    pl = P.estimate(m, 2 * t, P.PlanOptions(gpus=2, loss_tile=64))  # small tile: no loss peak
    assert pl.tokens_per_gpu == t
    assert pl.gib("checkpoints") * GIB == 2 * t * 64 * 2
    # MLP backward: the layer's activations + grads 3*64*2 + 2*128*2 = 896 per token;
    # attention backward: 916 + 3*64*2 + 1360 = 2660 < 2328 + 896 = 3224, so the MLP's peak
    assert pl.phase == "MLP backward"
    assert pl.gib("layer recompute") * GIB == t * 2328
    assert pl.gib("backward grads") * GIB == t * 896
    assert pl.gib("attention") == 0


def test_attention_backward_peak_when_attention_dominates():
    # 8 heads x 32 (MHA) and a small MLP: attention half 388 + 24*32*2 + (8*32*2 + 32) + 128
    # = 2596; ring working set (zigzag, no GQA expansion) 1056 + 4096 + 2048 + 768 = 7968
    m = P.ModelSpec(64, 2, 8, 8, 64, 256, head_dim=32)
    o = P.PlanOptions(gpus=2)
    assert P._attn_saved(m, 2) == 2596
    assert P._attention_backward(m, 2, o) == 7968
    pl = P.estimate(m, 2048, o)
    assert pl.phase == "attention backward"
    assert pl.gib("layer recompute") * GIB == 1024 * 2596
    assert pl.gib("backward grads") * GIB == 1024 * 3 * 64 * 2
    assert pl.gib("attention") * GIB == 1024 * 7968


def test_linear_in_sequence_and_halves_with_gpus():
    m = P.PRESETS["llama-1.1b"]
    o = P.PlanOptions(gpus=2)
    a, b, c = (P.estimate(m, s, o).peak_bytes for s in (2**18, 2**19, 3 * 2**18))
    assert b - a == pytest.approx(c - b)  # nothing quadratic in S
    act2 = P.estimate(m, 2**20, o).peak_bytes - P.estimate(m, 2**19, o).peak_bytes
    o4 = P.PlanOptions(gpus=4)
    act4 = P.estimate(m, 2**20, o4).peak_bytes - P.estimate(m, 2**19, o4).peak_bytes
    assert act4 == pytest.approx(act2 / 2)


def test_tiled_loss_phase_and_full_logits():
    m = P.PRESETS["llama-8b"]
    full = P.estimate(m, 2**16, P.PlanOptions(gpus=1, tiled_loss=False))
    assert full.phase == "loss"
    assert full.gib("logits/loss") * GIB == 2**16 * 128256 * 14 + 2**16 * 4096 * 2
    tiled = P.estimate(m, 2**16, P.PlanOptions(gpus=1))
    assert tiled.peak_bytes < full.peak_bytes
    tiny_tile = P.estimate(m, 2**16, P.PlanOptions(gpus=1, loss_tile=10**9))
    assert tiny_tile.phase == "loss"  # tile clipped to the rank's tokens = full logits


def test_max_seq_len_is_the_boundary():
    m, o = P.PRESETS["llama-1.1b"], P.PlanOptions(gpus=2)
    s = P.max_seq_len(m, o, 80)
    assert s % 4 == 0 and s > 0
    budget = 79 * GIB
    assert P.estimate(m, s, o).peak_bytes <= budget < P.estimate(m, s + 4, o).peak_bytes
    assert P.max_seq_len(P.PRESETS["llama-70b"], P.PlanOptions(gpus=1, zero=0), 80) == 0
    assert P.max_seq_len(m, P.PlanOptions(gpus=4), 80) > 1.9 * s


def test_config_json_and_errors(tmp_path, capsys):
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, vocab_size=256)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert P.load_spec(str(path)) == P.PRESETS["tiny"]
    with pytest.raises(ValueError, match="preset"):
        P.load_spec("no-such-model")
    with pytest.raises(ValueError, match="multiple of sp"):
        P.estimate(P.PRESETS["tiny"], 1001, P.PlanOptions(gpus=2))
    P.main(["--model", str(path), "--seq-len", "4096", "--gpus", "2", "--gpu-mem-gib", "1"])
    out = capsys.readouterr().out
    assert "attention" in out and "longest sequence" in out


def test_dilated_attention_term_tiny_by_hand():
    m = P.PRESETS["tiny"]  # 4 heads, 2 kv heads, d 16: GQA, K/V expanded in backward
    o = P.PlanOptions(gpus=2, layout="contiguous", attention="dilated", dilation_rates=(1, 2, 4))
    grads = 4 * 16 * 2 + 2 * (4 * 16 * 2 + 2 * 16 * 4)          # 128 + 2 * (128 + 128) = 640
    kernel = 4 * 16 * 4 + 2 * 4 * 16 * 2                        # 256 + 256 = 512
    held = 4 * 16 * 2 + 2 * 2 * 16 * 4                          # 128 + 256 = 384
    sums = (4 + 2 * 2) * 16 * 4 / 2                             # 256: rows of rate gcd(2, 4)
    rows = (3 * 4 + 2 * 2) * 16 * 2                             # 512
    want = max(grads + kernel, held + sums + (rows + grads + kernel) / 2)
    assert P._dilated_backward(m, 2, o) == want
    o_small_tile = P.PlanOptions(gpus=2, layout="contiguous", attention="dilated",
                                 dilation_rates=(1, 2, 4), loss_tile=64)
    assert P.estimate(m, 2048, o_small_tile).phase == "MLP backward"  # tiny: the MLP's is higher
    no_base = P.PlanOptions(gpus=2, attention="dilated", dilation_rates=(4,))
    assert P._dilated_backward(m, 2, no_base) == (4 + 2 * 2) * 16 * 4 / 4 + (
        rows + grads + kernel) / 4


# --- reach: activation offload, tiled MLP, host memory -------------------------------------
def test_offload_and_tiled_mlp_terms_tiny_by_hand():
    m = P.PRESETS["tiny"]  # h 64, 2 layers, 4 heads, 2 kv, d 16, I 128, V 256
    t = 1024
    o = P.PlanOptions(gpus=2, loss_tile=64, activation_offload=True, host_reserve_gib=2.0)
    pl = P.estimate(m, 2 * t, o)
    assert pl.gib("checkpoints") * GIB == t * 64 * 2        # one layer input (prefetched)
    assert pl.gib("rope") * GIB == t * 2 * 16 * 2
    assert pl.gib("final norm") == 0 and pl.phase == "MLP backward"  # freed before the layers
    assert pl.host_gib_of("checkpoints") * GIB == 2 * t * 64 * 2  # every layer's input
    assert pl.host_gib == pytest.approx(2.0 + 2 * t * 64 * 2 / GIB)
    plain = P.estimate(m, 2 * t, P.PlanOptions(gpus=2, loss_tile=64))
    # the same layer phase; GPU saves 1 of 2 checkpoints and the final norm (64*8 B/token)
    assert plain.peak_bytes - pl.peak_bytes == t * 64 * 2 + t * 64 * 8
    assert plain.host_components == [("process", 8.0 * GIB, plain.host_components[0][2])]
    # tiled MLP: the MLP half saves its norm and its input; grads lose 2*I*b per token and
    # gain one tile's intermediates + weight-gradient sums (tile = all 1024 tokens here)
    assert P._mlp_saved(m, 2, tiled=True) == 388 + 128
    work = 1024 * (6 * 128 * 2 + 2 * 64 * 2) + 3 * 64 * 128 * 6
    assert P._tiled_mlp_work(m, 2, 1024) == work
    tiled = P.estimate(m, 2 * t, P.PlanOptions(gpus=2, loss_tile=64, tiled_mlp=True))
    layer, grads = t * (916 + 516), t * 3 * 64 * 2 + work
    attn = t * (916 + 3 * 64 * 2) + t * P._attention_backward(m, 2, P.PlanOptions(gpus=2))
    assert tiled.phase == ("MLP backward" if layer + grads >= attn else "attention backward")
    assert tiled.peak_bytes == pytest.approx(
        plain.peak_bytes - plain.gib("layer recompute") * GIB - plain.gib("backward grads") * GIB
        + max(layer + grads, attn))
    with pytest.raises(ValueError, match="needs checkpointing"):
        P.estimate(m, 2 * t, P.PlanOptions(gpus=2, activation_offload=True, checkpointing=False))


def test_offload_loss_phase_counts_the_final_norm():
    m = P.PRESETS["tiny"]
    t = 1024
    o = P.PlanOptions(gpus=2, loss_tile=10**9, activation_offload=True)  # logits of all tokens
    pl = P.estimate(m, 2 * t, o)
    assert pl.phase == "loss"
    assert pl.gib("final norm") * GIB == t * 64 * 8


def test_llama_1b_offload_figures():
    m, s = P.PRESETS["llama-1.1b"], 2**20
    o = P.PlanOptions(gpus=1, activation_offload=True, tiled_mlp=True)
    pl = P.estimate(m, s, o)
    assert pl.gib("checkpoints") == 4.0                      # 1M x 2048 x 2 B
    assert pl.host_gib_of("checkpoints") == 88.0             # 22 layers of it
    assert pl.phase == "attention backward"                  # the tiled MLP is no longer the peak
    assert P.estimate(m, s, P.PlanOptions(gpus=1)).peak_gib - pl.peak_gib > 100


def test_reach_says_which_memory_limits():
    m = P.PRESETS["llama-1.1b"]
    o = P.PlanOptions(gpus=2, activation_offload=True, tiled_mlp=True)
    gpu_only = P.max_seq_len(m, o, 141)
    seq, limit = P.reach(m, o, 141, 64.0)
    assert limit == "host memory" and 0 < seq < gpu_only
    host = P.estimate(m, seq, o).host_bytes
    assert host <= 64 * GIB < P.estimate(m, seq + P.seq_divisor(o), o).host_bytes
    assert P.reach(m, o, 141, 10_000.0) == (gpu_only, "GPU memory")
    assert P.reach(m, P.PlanOptions(gpus=2), 141, 128.0)[1] == "GPU memory"
    dil = P.PlanOptions(gpus=2, attention="dilated", dilation_rates=(1, 2, 4, 8),
                        layout="contiguous")
    assert P.seq_divisor(dil) == 16 and P.max_seq_len(m, dil, 141) % 16 == 0


def test_attention_check_bytes_tiny_by_hand():
    m = P.PRESETS["tiny"]
    o = P.PlanOptions(gpus=2, attention="dilated", dilation_rates=(1, 2))  # dense is modelled
    per_token = 4 * 16 * 2 + 4 * 4 + (272 + 512 + 256 + 320) + (4 + 2 * 2) * 16 * 2
    assert P.attention_check_bytes(m, 2048, o) == 1024 * per_token


def test_cli_reach_table(capsys):
    P.main(["--model", "llama-1.1b", "--gpus", "2", "--gpu-mem-gib", "141", "--offload",
            "--tiled-mlp", "--host-mem-gib", "64", "--seq-len", "1048576"])
    out = capsys.readouterr().out
    assert "host: checkpoints" in out and "limited by host memory" in out
    assert "+ offload + tiled MLP" in out and "dilated (r = 1,2,4,8,16)" in out
    assert "1,048,576 tokens: GPU fits, host fits" in out


def _longest(out: str) -> int:
    line = next(x for x in out.splitlines() if x.startswith("longest sequence"))
    return int(line.rsplit(":", 1)[1].split()[0].replace(",", ""))


def test_cli_gpu_memory_given_detected_or_default(monkeypatch, capsys):
    import torch

    readme = ["--model", "llama-1.1b", "--gpus", "2", "--seq-len", "262144"]
    P.main(readme + ["--gpu-mem-gib", "141"])  # the README's command: 1.25M on 141 GiB
    out = capsys.readouterr().out
    assert "GPU memory: 141 GiB per GPU (--gpu-mem-gib)" in out
    assert round(_longest(out) / 1e6, 2) == 1.25

    class Props:  # what CUDA reports for device 0
        total_memory, name = 141 * GIB, "Test GPU"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    P.main(readme)
    detected = capsys.readouterr().out
    assert "GPU memory: 141 GiB per GPU (detected: CUDA device 0, Test GPU)" in detected
    assert _longest(detected) == _longest(out)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    P.main(readme)
    fallback = capsys.readouterr().out
    assert f"GPU memory: {P.FALLBACK_GPU_MEM_GIB:g} GiB per GPU (no CUDA device found" in fallback
    assert _longest(fallback) == P.max_seq_len(P.PRESETS["llama-1.1b"], P.PlanOptions(gpus=2),
                                              P.FALLBACK_GPU_MEM_GIB)


def test_kept_attention_term_tiny_by_hand():
    """recompute_attention=False: every layer keeps its attention output (b bytes per head
    element) and fp32 lse (4 bytes per head) per token, held through the step."""
    m = P.PRESETS["tiny"]  # 2 layers, 4 heads x d 16
    t = 1024
    plain = P.estimate(m, 2 * t, P.PlanOptions(gpus=2, loss_tile=64))
    kept = P.estimate(m, 2 * t, P.PlanOptions(gpus=2, loss_tile=64, keep_attention=True))
    want = 2 * t * (4 * 16 * 2 + 4 * 4)
    assert kept.gib("kept attention") * GIB == want
    assert kept.peak_bytes - plain.peak_bytes == want
    with pytest.raises(ValueError, match="needs checkpointing"):
        P.estimate(m, 2 * t, P.PlanOptions(gpus=2, keep_attention=True, checkpointing=False))
