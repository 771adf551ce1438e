"""The README's code blocks, run as a user runs them and compared with one process.

Every ```python block of README.md and examples/README.md follows a marker
``<!-- snippet: NAME -->`` and every NAME runs here: an unmarked or unknown block fails.
Bash blocks marked ``<!-- launch: NAME -->`` are launch lines; each snippet runs under the
CPU launch line its section names (``LAUNCHED``), in fresh processes, nothing started for it.

Fill-ins (what the README leaves to the user, supplied here):
  * ``model``: a tiny random Llama (fp32); ``dataset``: rows of 30 random tokens (the collator
    pads them to the layout's multiple), ``labels`` = ``input_ids``; ``my_collate``:
    ``transformers.default_data_collator``; ``q_full``/``k_full``/``v_full``/``x_full``: seeded
    random tensors, the same on every rank;
  * ``train.py`` is a script made of the fill-ins, the snippet and a few lines saving what the
    run produced (losses, weights, outputs); the launcher gets a free port (``--master_port`` /
    ``--main_process_port``, ``torchrun --standalone``).
The single-process references run the unpatched model on whole rows in the order of the SP run's
sampler, with the optimizer (type and settings) the snippet built.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pickle
import re
import shlex
import socket
import subprocess
import tempfile

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", os.path.join("examples", "README.md"))
MARKER = re.compile(r"<!-- (snippet|launch): ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)
TORCHRUN = ("attention", "ulysses", "plain-loop", "lora", "trainer")
LAUNCHED = {"deepspeed": "deepspeed-cpu", "accelerate": "accelerate-cpu",  # snippet: launch
            "tiled-loss": "deepspeed-cpu", **{name: "torchrun-cpu" for name in TORCHRUN}}
GPU_ONLY = ("deepspeed-gpu",)  # launch lines that need GPUs (their CPU twin runs)
VOCAB, ROW, ROWS = 64, 30, 6
LOSS_RTOL = 2e-5
LAUNCH_LIMIT_S = 300  # ~20-60 s alone on 2 cores: twice as slow and busy still passes


def blocks() -> dict[str, tuple[str, str]]:
    """{name: (kind, code)} of the marked blocks of both documents."""
    out = {}
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for kind, name, _, code in MARKER.findall(text):
            assert name not in out, f"{doc}: block name {name!r} used twice"
            out[name] = (kind, code)
    return out


def test_every_python_block_is_marked_and_run():
    known = set(LAUNCHED)
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for m in re.finditer(r"```python\n", text):
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            name = re.fullmatch(r"<!-- snippet: ([\w-]+) -->", before)
            assert name, f"{doc}: a python block at offset {m.start()} has no snippet marker"
            assert name.group(1) in known, f"{doc}: snippet {name.group(1)!r} is not run here"
    launches = {n for n, (k, _) in blocks().items() if k == "launch"}
    assert launches == set(LAUNCHED.values()) | set(GPU_ONLY), launches


# ------------------------------------------------------------------------------ fill-ins

def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def toy_dataset() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(1, VOCAB, (ROW,), generator=g) for _ in range(ROWS)]
    return [dict(input_ids=r, labels=r.clone()) for r in rows]


def fill_ins() -> dict:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1024, h, 16, generator=g) for h in (4, 2, 2))
    return dict(model=tiny_model(), dataset=toy_dataset(), my_collate=default_data_collator,
                q_full=q, k_full=k, v_full=v, x_full=torch.randn(1, 1024, 512, generator=g))


def record_losses(model) -> list[float]:
    losses: list[float] = []

    def hook(module, args, out):
        if torch.is_grad_enabled() and out.get("loss") is not None:
            losses.append(out["loss"].item())

    model.register_forward_hook(hook)
    return losses


@contextlib.contextmanager
def joined_group():
    """A variant of a snippet (a line removed), run after the snippet itself in the same
    processes: its ``torch.distributed.init_process_group()`` joins the group the snippet
    started."""
    real = dist.init_process_group

    def join(*args, **kwargs):
        assert dist.is_initialized()

    dist.init_process_group = join
    try:
        yield
    finally:
        dist.init_process_group = real


def run_snippet(code: str, ns: dict) -> dict:
    with joined_group():
        exec(compile(code, "<README snippet>", "exec"), ns)
    return ns


def weights(model) -> dict:
    return {n: p.detach().float().numpy().copy() for n, p in model.named_parameters()}


def optimizer_spec(optimizer) -> tuple[type, dict]:
    """The optimizer's class and constructor settings (``defaults`` also holds derived keys)."""
    accepted = inspect.signature(type(optimizer)).parameters
    return type(optimizer), {k: v for k, v in optimizer.defaults.items() if k in accepted}


def expect_error(code: str, ns: dict, exc: type, match: str) -> str:
    try:
        run_snippet(code, ns)
    except exc as e:
        assert re.search(match, str(e)), str(e)
        return str(e)
    raise AssertionError(f"the snippet ran without the expected {exc.__name__}: {match}")


def without(code: str, pattern: str) -> str:
    new, n = re.subn(pattern, "", code, flags=re.M)
    assert n == 1, f"{pattern!r} matched {n} times in the snippet"
    return new


# ------------------------------------------------------- what each torchrun snippet leaves

def collect(name: str, ns: dict) -> dict:
    """Run in each rank of the snippet's ``torchrun`` after the snippet (``ns``: its globals):
    what the parent compares with the references, and the variants that must fail."""
    from seqpar_ring import groups as sp_groups
    from seqpar_ring.layout import shard
    from seqpar_ring.modules import reference_forward

    import reference

    code = {n: c for n, (kind, c) in blocks().items() if kind == "snippet"}
    res: dict = {}
    if name in ("attention", "ulysses"):
        full = [ns[n].double() for n in ("q_full", "k_full", "v_full")]
        ref = reference.sdpa_reference(*full, causal=True)
    if name == "attention":  # against single-device references on the full tensors
        res["ring_err"] = (ns["out_full"].double() - ref).abs().max().item()
        dil = reference.dilated_reference(*full, [256, 512, 1024], [1, 2, 4], causal=True)
        mine = ns["groups"].sp_rank
        res["dilated_err"] = (ns["out"].double() - shard(dil, 2, mine, "contiguous")
                              ).abs().max().item()
        y_ref = shard(reference_forward(ns["mha"], ns["x_full"]), 2, mine, "zigzag")
        res["mha_err"] = (ns["y"] - y_ref).abs().max().item()
    elif name == "ulysses":
        want = shard(ref, 2, ns["groups"].sp_rank, ns["cfg"].layout, ulysses_size=2)
        res["ulysses_err"] = (ns["out"].double() - want).abs().max().item()
    elif name == "plain-loop":  # then without the gradient sum: must refuse
        loader = ns["loader"]
        res.update(params=weights(ns["model"]), optim=optimizer_spec(ns["optimizer"]),
                   batch=loader.batch_size, shuffle=loader.sampler.shuffle,
                   seed=loader.sampler.seed)
        res["forgot"] = expect_error(without(code["plain-loop"], r"^\s*sync_sp_gradients\(.*\n"),
                                     fill_ins(), RuntimeError, "never summed over the SP ranks")
    elif name == "lora":  # only the adapters train
        res.update(params=weights(ns["_model"]), lora_config=ns["model"].peft_config["default"],
                   trainable=sorted(n for n, p in ns["model"].named_parameters()
                                    if p.requires_grad), optim=optimizer_spec(ns["optimizer"]))
    elif name == "trainer":  # then without use_cpu: must refuse (nothing would sum gradients)
        res.update(params=weights(ns["model"]), args=_init_args(ns["trainer"].args),
                   train_loss=ns["trainer"].state.log_history[-1]["train_loss"])
        sp_groups.destroy()
        res["trainer-no-cpu"] = expect_error(
            without(code["trainer"], r",\s*use_cpu=not torch\.cuda\.is_available\(\)"),
            fill_ins(), ValueError, r"use_cpu=True")
    return res


def _compare(name: str, res: list[dict]) -> None:
    """The parent's side: the ranks agree, and the run equals one process."""
    if "params" in res[0]:  # the SP ranks hold identical weights
        for n, w in res[0]["params"].items():
            assert (w == res[1]["params"][n]).all(), f"{name}: ranks differ in {n}"
    mine = res[0]
    if name == "attention":
        for r in res:
            assert r["ring_err"] <= 1e-5 and r["dilated_err"] <= 1e-5 and r["mha_err"] <= 1e-5, r
    elif name == "ulysses":
        assert all(r["ulysses_err"] <= 1e-5 for r in res), res
    elif name == "plain-loop":
        assert all("sync_sp_gradients(model)" in r["forgot"] for r in res)
        model = tiny_model()
        ref_losses = reference_loop(model, mine["optim"], mine["batch"], mine["shuffle"],
                                    mine["seed"])
        assert_same("plain loop", mine["losses"], ref_losses, mine["params"], weights(model),
                    1e-5)
    elif name == "lora":
        from peft import get_peft_model

        assert mine["trainable"] and all("lora_" in n for n in mine["trainable"])
        model = tiny_model()
        torch.manual_seed(11)
        peft_model = get_peft_model(model, mine["lora_config"])
        ref_losses = reference_loop(peft_model, mine["optim"], 1, True, 0)
        assert_same("LoRA", mine["losses"], ref_losses, mine["params"], weights(model), 1e-5)
    elif name == "trainer":
        assert all("use_cpu=True" in r["trainer-no-cpu"] for r in res)
        ref_loss, ref_params = _reference_trainer(mine["args"])
        assert abs(mine["train_loss"] - ref_loss) <= LOSS_RTOL * abs(ref_loss), (
            mine["train_loss"], ref_loss)
        for n, ref in ref_params.items():
            err = abs(mine["params"][n] - ref).max()
            assert err <= 1e-5, f"Trainer: {n} differs from one process by {err:.2e}"


def _init_args(args: TrainingArguments) -> dict:
    """The constructor arguments of ``args`` that differ from the defaults."""
    default = TrainingArguments(output_dir=args.output_dir)
    return {f: getattr(args, f) for f in ("per_device_train_batch_size", "learning_rate",
                                          "num_train_epochs", "max_steps", "seed",
                                          "gradient_accumulation_steps", "max_grad_norm",
                                          "weight_decay", "lr_scheduler_type", "optim",
                                          "warmup_steps", "dataloader_drop_last")
            if getattr(args, f) != getattr(default, f)}


def reference_loop(model, optim, batch: int, shuffle: bool, seed: int, clip: float | None = None):
    """One process, unpatched, whole rows, the SP run's sample order and optimizer."""
    from torch.utils.data import DataLoader, DistributedSampler

    data = toy_dataset()
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
    cls, defaults = optim
    opt = cls([p for p in model.parameters() if p.requires_grad], **defaults)
    losses = []
    for b in DataLoader(data, batch_size=batch, sampler=sampler,
                        collate_fn=default_data_collator):
        loss = model(**b).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def assert_same(what: str, losses, ref_losses, params, ref_params, param_atol: float) -> None:
    assert len(losses) == len(ref_losses) > 0, (what, losses, ref_losses)
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"{what}: losses {losses} vs {ref_losses}"
    for n, ref in ref_params.items():
        err = abs(params[n] - ref).max()
        assert err <= param_atol, f"{what}: {n} differs from one process by {err:.2e}"


def _reference_trainer(init: dict) -> tuple[float, dict]:
    from torch.utils.data import DataLoader, DistributedSampler

    class EpochLoader(DataLoader):
        def set_epoch(self, epoch: int) -> None:
            self.sampler.set_epoch(epoch)

    class SameOrderTrainer(Trainer):  # SPTrainer's DP sampler, one replica
        def get_train_dataloader(self):
            a = self.args
            sampler = DistributedSampler(self.train_dataset, num_replicas=1, rank=0, seed=a.seed)
            return EpochLoader(self.train_dataset, batch_size=a.per_device_train_batch_size,
                               sampler=sampler, collate_fn=default_data_collator,
                               drop_last=a.dataloader_drop_last)

    model = tiny_model()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, use_cpu=True, save_strategy="no", **init)
        trainer = SameOrderTrainer(model=model, args=args, train_dataset=toy_dataset())
        trainer.train()
    return trainer.state.log_history[-1]["train_loss"], weights(model)


# ------------------------------------------------------------------------- launch lines

EPILOGUE = """
import torch.distributed as _dist
_dist.barrier()
torch.save({"losses": _losses, "params": {n: p.detach().clone() for n, p in
            _model.named_parameters()}}, os.path.join(_OUT, f"rank{_dist.get_rank()}.pt"))
"""


# The tiled loss never calls the model's top-level forward: record what the call returns.
RECORD_TILED = """
import seqpar_ring.integrations.hf_tiled as _tiled
_tiled_loss = _tiled.tiled_causal_lm_loss
def _recorded(*a, **k):
    loss = _tiled_loss(*a, **k)
    _losses.append(loss.item())
    return loss
_tiled.tiled_causal_lm_loss = _recorded
"""


# After a torchrun snippet: what `collect` found, saved per rank for the parent.
COLLECT = """
import pickle, torch.distributed as _dist
from test_readme_snippets import collect
_rank = _dist.get_rank()
_res = {**collect(_NAME, globals()), "losses": _losses}
with open(os.path.join(_OUT, f"rank{_rank}.pkl"), "wb") as _f:
    pickle.dump(_res, _f)
"""


def _script(name: str, snippet: str, out: str) -> str:
    prelude = (
        "import os, sys, torch\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
        "torch.set_num_threads(1)\n"
        "from test_readme_snippets import fill_ins, record_losses\n"
        "globals().update(fill_ins())\n"
        f"_model, _OUT, _NAME = model, {out!r}, {name!r}\n"
        "_losses = record_losses(model)\n"
        + ("torch.manual_seed(11)  # the adapters' initialisation, as in the reference\n"
           if name == "lora" else "")
    )
    tail = COLLECT if LAUNCHED[name] == "torchrun-cpu" else EPILOGUE
    return prelude + (RECORD_TILED if name == "tiled-loss" else "") + snippet + tail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(name: str, snippet: str, line: str, tmp) -> tuple[list[dict], str]:
    """Run ``snippet`` under the launch ``line`` as ``train.py``; return each rank's results
    and the output. Launched in ``tmp`` when the line names no file of the repository."""
    script = tmp / "train.py"
    script.write_text(_script(name, snippet, str(tmp)))
    argv = shlex.split(line.replace("\\\n", " "))
    assert "train.py" in argv, argv
    argv[argv.index("train.py")] = str(script)
    port = str(_free_port())
    if argv[0] in ("deepspeed", "torchrun"):
        argv[1:1] = ["--master_port", port]
    else:
        argv[2:2] = ["--main_process_port", port]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cwd = ROOT if "configs/" in line else str(tmp)  # the Trainer writes its output_dir there
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=LAUNCH_LIMIT_S)
    log = proc.stdout[-4000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, f"{line} failed:\n{log}"
    assert "all_gather_into_tensor` is deprecated" not in proc.stderr, log
    if LAUNCHED[name] == "torchrun-cpu":
        results = [pickle.loads((tmp / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    else:
        results = [torch.load(tmp / f"rank{r}.pt") for r in range(2)]
    return results, proc.stdout + proc.stderr


def _ds_reference() -> tuple[list[float], dict]:
    """One process with what configs/cpu_gloo.json asks DeepSpeed for: AdamW, clipping."""
    ds = json.load(open(os.path.join(ROOT, "configs", "cpu_gloo.json")))
    assert ds["optimizer"]["type"] == "AdamW" and ds.get("gradient_accumulation_steps", 1) == 1
    params = {k: v for k, v in ds["optimizer"]["params"].items() if k != "torch_adam"}
    model = tiny_model()
    losses = reference_loop(model, (torch.optim.AdamW, params), 1, True, 0,
                            clip=ds.get("gradient_clipping"))
    return losses, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("snippet", sorted(LAUNCHED))
def test_launch_line_runs_the_snippet(snippet, tmp_path):
    found = blocks()
    if LAUNCHED[snippet] == "torchrun-cpu":
        if snippet == "lora":
            pytest.importorskip("peft")
        results, _ = _launch(snippet, found[snippet][1], found["torchrun-cpu"][1], tmp_path)
        _compare(snippet, results)
        return
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    results, output = _launch(snippet, found[snippet][1], found[LAUNCHED[snippet]][1], tmp_path)
    ref_losses, ref_params = _ds_reference()
    for res in results:
        assert_same(snippet, res["losses"], ref_losses,
                    {n: p.numpy() for n, p in res["params"].items()},
                    {n: p.numpy() for n, p in ref_params.items()}, 1e-5)
    if snippet == "accelerate":  # the one wrong state accelerate cannot fix is explained
        assert "is_main_process=True" in output
