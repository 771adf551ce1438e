"""accelerate + DeepSpeed with the same JSON section: the env of `accelerate launch --use_deepspeed
--deepspeed_config_file <json>` in each gloo rank, ZeRO-3, against one process (CPU).

accelerate 1.15 has no multi-process DeepSpeed mode on CPU (without a GPU it reports
num_processes=1 under DeepSpeed), so each rank builds its Accelerator inside an existing gloo
process group; nothing on our path reads accelerate's process count.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

from tests import test_deepspeed as T  # noqa: E402
from tests._dist import run_distributed  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _accelerate_body(rank, world, path):
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch` exports
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = path
    from accelerate import Accelerator
    from accelerate.utils import DummyOptim

    from seqpar_ring.integrations.accelerate import setup_sequence_parallel
    from seqpar_ring.integrations.hf import SPDataCollator

    accelerator = Accelerator()
    model = T._tiny_llama()
    live = accelerator.state.deepspeed_plugin.deepspeed_config
    micro_cfg = live["train_micro_batch_size_per_gpu"]
    live["train_micro_batch_size_per_gpu"] = "auto"  # accelerate could only fill it from prepare
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu is \"auto\""):
        setup_sequence_parallel(accelerator, model)
    live["train_micro_batch_size_per_gpu"] = micro_cfg
    with warnings.catch_warnings(record=True) as caught:  # accelerate counts 1 process on CPU
        warnings.simplefilter("always")
        cfg, g = setup_sequence_parallel(accelerator, model)
    assert (accelerator.num_processes == world) or rank != 0 or any(
        "is_main_process=True" in str(w.message) for w in caught)
    engine, optimizer = accelerator.prepare(model, DummyOptim(model.parameters()))
    with pytest.raises(ValueError, match=r"before accelerator\.prepare"):
        setup_sequence_parallel(accelerator, engine)
    assert (engine.dp_world_size, engine.seq_dp_world_size) == (g.dp_size, world)
    micro = 2
    data = T._batches(T.STEPS, micro * g.dp_size)
    collate = SPDataCollator(cfg, g)
    losses = []
    for batch in data:
        rows = batch[g.dp_rank * micro:(g.dp_rank + 1) * micro]
        loss = engine(**collate.shard({"input_ids": rows, "labels": rows})).loss
        accelerator.backward(loss)  # DeepSpeed backward + step
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    ref_losses, ref_params = T._reference(data, 1)
    params = T._params(engine)
    worst = max(((params[n] - r).abs().max() / r.abs().max()).item()
                for n, r in ref_params.items())
    assert worst <= 1e-5, f"accelerate ZeRO-3: parameters differ from one process by {worst:.2e}"
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    return worst


def test_accelerate_zero3_sp2_matches_single_process(tmp_path):
    cfg = json.loads((CONFIGS / "cpu_gloo.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=2, gradient_clipping=0.0,
               zero_allow_untested_optimizer=True,
               optimizer={"type": "SGD", "params": {"lr": T.LR, "momentum": 0.9}},
               zero_optimization={"stage": 3})
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(cfg))
    run_distributed(_accelerate_body, 2, str(path), timeout=180)


def test_configs_parse_and_validate():
    from deepspeed.runtime.config import DeepSpeedConfig

    from seqpar_ring.integrations import deepspeed as sp_ds

    names = sorted(p.name for p in CONFIGS.glob("*.json"))
    expected = {"zero2_sp.json", "zero3_sp.json", "zero3_sp_dilated.json", "cpu_gloo.json"}
    assert expected <= set(names)
    readme = (CONFIGS / "README.md").read_text()
    for name in names:
        assert name in readme, f"{name} is not documented in configs/README.md"
        cfg, ds = sp_ds.split_config(CONFIGS / name)
        sp_ds.validate_for_world(cfg, ds, 8)
        ds = {**ds, "sequence_parallel_size": 1}  # DeepSpeedConfig without a process group
        assert DeepSpeedConfig(ds).train_micro_batch_size_per_gpu >= 1
