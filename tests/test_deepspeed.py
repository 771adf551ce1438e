"""DeepSpeed integration: the JSON section, flags, errors before any collective, and training
under SP x DP with ZeRO 1/2/3 against a single-process run of the same global batch (gloo, CPU).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from seqpar_ring.config import SeqParConfig  # noqa: E402
from seqpar_ring.integrations import deepspeed as sp_ds  # noqa: E402
from seqpar_ring.integrations.ds_checkpoint import _check  # noqa: E402
from tests._dist import run_distributed  # noqa: E402

SEQ, VOCAB, STEPS, LR = 16, 64, 3, 0.05
CPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu_gloo.json"


# --- config section and flags (no processes) -----------------------------------------------
def test_section_fills_and_conflicts():
    cfg, ds = sp_ds.split_config({"sequence_parallel": {"size": 2, "layout": "contiguous"}})
    assert cfg == SeqParConfig(sp_size=2, layout="contiguous") and ds["sequence_parallel_size"] == 2
    cfg, ds = sp_ds.split_config({"sequence_parallel_size": 4})
    assert cfg.sp_size == 4 and ds["sequence_parallel"]["size"] == 4
    assert sp_ds.split_config({})[0].sp_size == 1
    with pytest.raises(ValueError, match=r"sequence_parallel\.size=2 conflicts with "
                                         r"sequence_parallel_size=4"):
        sp_ds.split_config({"sequence_parallel_size": 4, "sequence_parallel": {"size": 2}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sizes'\]"):
        sp_ds.split_config({"sequence_parallel": {"sizes": 2}})
    with pytest.raises(ValueError, match=r"sequence_parallel\.attention='flash' is not one of"):
        sp_ds.split_config({"sequence_parallel": {"attention": "flash"}})


def test_flags_override_json(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"sequence_parallel": {"size": 2, "layout": "zigzag"}, '
                    '"train_micro_batch_size_per_gpu": 1}')
    parser = sp_ds.add_argparse_args(argparse.ArgumentParser())
    parser.add_argument("--deepspeed_config")
    args = parser.parse_args([
        "--deepspeed_config", str(path), "--sequence-parallel-size", "4",
        "--sequence-parallel-attention", "dilated", "--sequence-parallel-layout", "contiguous",
        "--segment-lengths", "8", "16", "--dilation-rates", "1", "2",
        "--sequence-parallel-bucket-size", "64", "--sequence-parallel-kernel", "torch",
        "--sequence-parallel-comm", "ring",
    ])
    cfg, ds = sp_ds.config_from_args(args)
    assert cfg == SeqParConfig(sp_size=4, attention="dilated", layout="contiguous",
                               segment_lengths=(8, 16), dilation_rates=(1, 2), bucket_size=64,
                               kernel="torch")
    assert ds["sequence_parallel_size"] == 4 and ds["sequence_parallel"]["size"] == 4
    cfg, _ = sp_ds.config_from_args(parser.parse_args(["--deepspeed_config", str(path)]))
    assert cfg.sp_size == 2  # no flag: the JSON value


def test_flags_accept_what_launchers_pass():
    import deepspeed

    parser = sp_ds.add_argparse_args(deepspeed.add_config_arguments(argparse.ArgumentParser()))
    args = parser.parse_args(["--local_rank=1", "--deepspeed", "--deepspeed_config", "c.json",
                              "--sequence-parallel-size", "2"])  # the deepspeed launcher
    assert (args.local_rank, args.sp_size, args.deepspeed) == (1, 2, True)
    assert parser.parse_args(["--local-rank=3"]).local_rank == 3  # torch.distributed.launch
    assert parser.parse_args([]).local_rank == -1
    own = argparse.ArgumentParser()
    own.add_argument("--local_rank", type=int, default=7, help="the script's own")
    sp_ds.add_argparse_args(own)  # kept, not clobbered; the other spelling is added
    assert own.parse_args([]).local_rank == 7
    assert own.parse_args(["--local-rank", "2"]).local_rank == 2


def test_deepspeed_ignores_the_section():
    from deepspeed.runtime.config import DeepSpeedConfig

    _, ds = sp_ds.split_config({"train_micro_batch_size_per_gpu": 2,
                                "sequence_parallel": {"size": 1, "attention": "ring"}})
    assert DeepSpeedConfig(ds).train_batch_size == 2


def test_validate_for_world_names_keys():
    ok = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2}
    sp_ds.validate_for_world(SeqParConfig(sp_size=2), {**ok, "train_batch_size": 4}, 4)
    with pytest.raises(ValueError, match=r"sequence_parallel\.size \(sequence_parallel_size\) = 3"):
        sp_ds.validate_for_world(SeqParConfig(sp_size=3), ok, 4)
    with pytest.raises(ValueError, match=r"train_batch_size=8 != .* dp\(2\)"):
        sp_ds.validate_for_world(SeqParConfig(sp_size=2), {**ok, "train_batch_size": 8}, 4)
    with pytest.raises(ValueError, match="data_parallel_size=4"):
        sp_ds.validate_for_world(SeqParConfig(sp_size=2), {**ok, "data_parallel_size": 4}, 4)
    bad_zero3 = {**ok, "zero_optimization": {"stage": 3, "reduce_scatter": False}}
    with pytest.raises(ValueError, match=r"zero_optimization\.reduce_scatter"):
        sp_ds.validate_for_world(SeqParConfig(sp_size=2), bad_zero3, 4)


@pytest.mark.parametrize("section, match", [
    ({"sequence_parallel": {"size": 3}}, r"sequence_parallel\.size .* = 3 does not divide"),
    ({"sequence_parallel": {"size": 2}, "sequence_parallel_size": 4}, "conflicts with"),
    ({"sequence_parallel": {"size": 2, "attention": "sparse"}}, r"sequence_parallel\.attention"),
])
def test_initialize_fails_before_any_collective(monkeypatch, section, match):
    # WORLD_SIZE comes from the launcher; nothing may touch torch.distributed before the check
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=match):
        sp_ds.initialize(model=torch.nn.Linear(2, 2),
                         config={"train_micro_batch_size_per_gpu": 1, **section})
    assert not dist.is_initialized()


def test_checkpoint_compatibility_rules():
    def state(sp, dp, stage=2):
        return {"sequence_parallel": SeqParConfig(sp_size=sp).to_dict(), "sp_size": sp,
                "dp_size": dp, "world_size": sp * dp, "zero_stage": stage}

    _check(state(2, 2), state(4, 1), True)  # other SP size, same world: loads
    _check(state(2, 1), state(2, 2), False)  # no optimizer states: loads
    with pytest.raises(RuntimeError, match="saved on world_size 2 .* load_optimizer_states=False"):
        _check(state(2, 1), state(2, 2), True)


# --- training under SP x DP against one process ----------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def _ds_config(sp, stage, micro, gas, clip=0.0):
    # clipping hides a wrong gradient scale: most cases run without it, some with it active
    return {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
        "gradient_clipping": clip, "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": 0.9}},
        "zero_optimization": {"stage": stage},
        "sequence_parallel": {"size": sp, "layout": "zigzag", "kernel": "torch"},
        "steps_per_print": 1000,
    }


def _batches(n_steps, global_batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n_steps, global_batch, SEQ), generator=g)


def _reference(data, gas, clip=0.0):
    """One process, whole global batch, plain SGD: losses per step and final parameters."""
    model = _tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for batch in data:
        opt.zero_grad()
        total = 0.0
        for micro in batch.chunk(gas):  # DeepSpeed: mean over micro steps and replicas
            loss = model(input_ids=micro, labels=micro).loss
            (loss / gas).backward()
            total += loss.item() / gas
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(engine, data, micro, gas, start=0):
    """Run DeepSpeed steps ``start..``; returns the DP-mean loss of each step."""
    from seqpar_ring.integrations.hf import SPDataCollator

    g = engine.seqpar_groups
    collate = SPDataCollator(engine.seqpar_config, g)
    losses = []
    for batch in data[start:]:
        total = torch.zeros(())
        for m in range(gas):  # micro step m of replica dp_rank takes its own samples
            first = (m * g.dp_size + g.dp_rank) * micro
            rows = batch[first:first + micro]
            loss = engine(**collate.shard({"input_ids": rows, "labels": rows})).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach() / gas
        dist.all_reduce(total, group=g.dp_group)
        losses.append(total.item() / g.dp_size)
    return losses


def _params(engine):
    import deepspeed

    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params],
                                           enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in params}


def _teardown(engine):
    import seqpar_ring

    engine.destroy()
    seqpar_ring.destroy()


def _match_cases(rank, world, cases):
    """Each (sp, stage, micro, gas, clip[, "bf16"]) case: 3 steps equal one process on the
    global batch (fp32: <= 1e-5 relative; bf16: the fp32 run within bf16 rounding)."""
    out = []
    for sp, stage, micro, gas, clip, *bf16 in cases:
        dp = world // sp
        data = _batches(STEPS, micro * gas * dp)
        ref_losses, ref_params = _reference(data, gas, clip)
        config = _ds_config(sp, stage, micro, gas, clip)
        tol = 1e-5
        if bf16:
            config["bf16"], tol = {"enabled": True}, 2e-2
        engine, *_ = sp_ds.initialize(model=_tiny_llama(), config=config)
        assert (engine.dp_world_size, engine.train_batch_size()) == (dp, micro * gas * dp)
        losses = _train(engine, data, micro, gas)
        params = {n: p.float() for n, p in _params(engine).items()}
        _teardown(engine)
        worst = max(((params[n] - r).abs().max() / r.abs().max()).item()
                    for n, r in ref_params.items())
        tag = f"sp={sp} dp={dp} zero={stage} micro={micro} gas={gas} clip={clip} {bf16}"
        assert worst <= tol, f"{tag}: parameters differ from one process by {worst:.2e}"
        assert losses == pytest.approx(ref_losses, rel=tol, abs=1e-6), (tag, losses, ref_losses)
        out.append((tag, worst))
    return out


def test_sp2_world2_matches_single_process():
    # (sp, zero stage, micro batch, grad accumulation, clipping)
    cases = [(2, 0, 2, 1, 0.0), (2, 1, 2, 1, 0.0), (2, 2, 1, 2, 0.0), (2, 3, 2, 1, 0.0),
             (2, 3, 1, 2, 0.5), (2, 3, 2, 1, 0.0, "bf16")]
    run_distributed(_match_cases, 2, cases, timeout=240)


def test_world4_matches_single_process():
    cases = [(2, 1, 1, 1, 0.0), (2, 2, 1, 1, 0.5), (2, 3, 1, 1, 0.0), (4, 3, 1, 1, 0.0),
             (4, 1, 1, 1, 0.5)]
    run_distributed(_match_cases, 4, cases, timeout=300)


# --- checkpoints ------------------------------------------------------------------------------
CKPT_STEPS = 5


def _ckpt_config(sp, stage, micro):
    """configs/cpu_gloo.json (AdamW: its moments must be restored too) at this SP size / stage."""
    cfg = json.loads(CPU_CONFIG.read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro, sequence_parallel_size=sp,
               zero_optimization={"stage": stage})
    cfg["sequence_parallel"]["size"] = sp
    return cfg


def _ckpt_save(rank, world, path, stage):
    data = _batches(CKPT_STEPS, 2)
    engine, *_ = sp_ds.initialize(model=_tiny_llama(), config=_ckpt_config(2, stage, 2))
    _train(engine, data[:3], 2, 1)
    sp_ds.save_checkpoint(engine, path, client_state={"step": 3})
    after = _train(engine, data, 2, 1, start=3)
    _teardown(engine)
    return after


def _ckpt_load(rank, world, path, stage):
    data = _batches(CKPT_STEPS, 2)
    out = {}
    for sp, micro in ((2, 2), (1, 1)):  # same SP size; then SP 1 x DP 2 on the same world
        engine, *_ = sp_ds.initialize(model=_tiny_llama(), config=_ckpt_config(sp, stage, micro))
        _, client = sp_ds.load_checkpoint(engine, path)
        assert client["step"] == 3 and client["seqpar_ring"]["sp_size"] == 2
        out[sp] = _train(engine, data, micro, 1, start=3)
        _teardown(engine)
    return out


@pytest.mark.parametrize("stage", [3])
def test_checkpoint_resume_in_new_processes(tmp_path, stage):
    path = str(tmp_path / "ckpt")
    uninterrupted = run_distributed(_ckpt_save, 2, path, stage, timeout=180)[0]
    assert os.path.isfile(os.path.join(path, "global_step3", "seqpar_ring.json"))
    resumed = run_distributed(_ckpt_load, 2, path, stage, timeout=180)[0]
    assert resumed[2] == uninterrupted  # same SP size: bit-identical
    assert resumed[1] == pytest.approx(uninterrupted, rel=1e-5)  # other SP size: same math


def test_ranks_sharing_a_gpu_get_deepspeed_a_device_that_exists(monkeypatch):
    """torchrun --nproc-per-node 2 on one GPU: DeepSpeed puts a rank on cuda:LOCAL_RANK, which
    does not exist for rank 1 ("invalid device ordinal" on an H200). `initialize` maps the rank
    to local % GPUs, LOCAL_RANK included, and starts gloo (NCCL refuses two ranks on a GPU)."""
    import deepspeed

    devices, backends = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: backends.append(
        dist_backend))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert sp_ds.shared_gpu_device() == 0
    sp_ds._init_distributed(None)
    assert devices == [0] and backends == ["gloo"] and os.environ["LOCAL_RANK"] == "0"
    assert sp_ds.shared_gpu_device() == 0  # idempotent once mapped
    sp_ds._init_distributed("nccl")  # the user's explicit choice is kept
    assert backends[-1] == "nccl"
    # one rank per GPU (or more GPUs than ranks): nothing changes
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert sp_ds.shared_gpu_device() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sp_ds.shared_gpu_device() is None
