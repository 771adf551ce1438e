"""HF transformers integration: patched tiny Llama / Mistral / Qwen2 / Qwen3 under SP = 2 and 4.

Each case builds a tiny random model from its config class (no downloads, fp32), runs the
UNPATCHED model on the full batch in-process as the reference, then a patched copy on this
rank's shard (SPDataCollator) and checks the loss and every parameter gradient (summed over the
SP group) against it. One spawn per world size loops over all cases.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from seqpar_ring import SeqParConfig, groups as sp_groups  # noqa: E402
from seqpar_ring.integrations.hf import (  # noqa: E402
    ATTN_NAME,
    DOC_IDS_KEY,
    SPDataCollator,
    patch,
    register,
    shard_dataloader,
)

MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
VOCAB, SEQ = 128, 16
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4
TIMEOUT_S = 170.0


def tiny_model(name: str, seed: int = 0, **overrides) -> nn.Module:
    config_cls, model_cls = MODELS[name]
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, attention_dropout=0.0,
              max_position_embeddings=64)
    if name == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).float()
    model.config.use_cache = False
    return model


def make_batch(kind: str, seed: int = 1) -> dict:
    """Full (unsharded) rows: 'plain', 'pad' (14 tokens, left + right padding), 'packed'."""
    g = torch.Generator().manual_seed(seed)
    if kind == "pad":
        ids = torch.randint(1, VOCAB, (2, 14), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # right padding
        mask[1, :2] = 0  # left padding
        labels = ids.masked_fill(mask == 0, -100)
        pos = torch.arange(14).expand(2, 14).clone()
        return dict(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(2, SEQ).clone()
    labels = ids.clone()
    if kind == "packed":  # docs of 5, 7, 4 and 9, 7 tokens: boundaries fall inside and on shards
        rows = [[5, 7, 4], [9, 7]]
        for r, lens in enumerate(rows):
            pos[r] = torch.cat([torch.arange(n) for n in lens])
        labels = labels.masked_fill(pos == 0, -100)  # no label across a document boundary
    return dict(input_ids=ids, position_ids=pos, labels=labels)


def loss_and_grads(model: nn.Module, batch: dict, group=None) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            if group is not None:  # each SP rank holds its tokens' share: the sum is the gradient
                dist.all_reduce(g, group=group)
            grads[n] = g
    return loss.item(), grads


def assert_match(what: str, loss, grads, ref_loss, ref_grads) -> None:
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), f"{what}: loss {loss} vs {ref_loss}"
    assert grads.keys() == ref_grads.keys()
    for n, ref in ref_grads.items():
        err = (grads[n] - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= GRAD_RTOL * scale + 1e-9, f"{what}: grad {n} err {err:.3e} (max {scale:.3e})"


def check_case(what, base, cfg, groups, batch, *, ref_model=None, prep=None, derive=False):
    """Reference (unpatched ``base`` or ``ref_model``) on the full batch vs patched SP copy.

    ``derive``: drop the collator's sp_doc_ids so attention derives them from position_ids.
    """
    ref_model = ref_model if ref_model is not None else copy.deepcopy(base)
    ref = loss_and_grads(ref_model, batch)
    model = copy.deepcopy(base)
    if prep is not None:
        model = prep(model)
    patch(model, cfg, groups)
    local = SPDataCollator(cfg, groups).shard(dict(batch))
    if derive:
        assert local.pop(DOC_IDS_KEY, None) is not None
    assert_match(what, *loss_and_grads(model, local, groups.sp_group), *ref)


def expect_error(exc, match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def _model_cases(rank: int, world: int) -> None:
    groups = sp_groups.initialize(world)
    for name in MODELS:
        base = tiny_model(name)
        for layout in ("contiguous", "zigzag"):
            cfg = SeqParConfig(sp_size=world, layout=layout)
            for kind in ("plain", "pad", "packed"):
                check_case(f"{name}/{layout}/{kind}/sp{world}", base, cfg, groups,
                           make_batch(kind))
        # dilated: the same patched model with sp_size=1 (no groups) is the reference
        dil = dict(attention="dilated", layout="contiguous", segment_lengths=[SEQ // 2, SEQ],
                   dilation_rates=[1, 2])
        ref_model = copy.deepcopy(base)
        patch(ref_model, SeqParConfig(sp_size=1, **dil), None)
        batch = make_batch("plain")
        check_case(f"{name}/dilated/sp{world}", base, SeqParConfig(sp_size=world, **dil),
                   groups, batch, ref_model=ref_model)
    if world == 2:
        _feature_and_error_cases(groups)
    sp_groups.destroy()


def _checkpointed(model):
    model.gradient_checkpointing_enable()
    model.train()
    return model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False)
    return get_peft_model(model, lora)


class _NoRoutingAttention(nn.Module):  # attention that never asks the interface
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class _NoRoutingLM(PreTrainedModel):
    config_class = LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.attn = _NoRoutingAttention()
        self.post_init()

    def forward(self, input_ids=None, **kwargs):
        return self.attn(torch.zeros(1, 8))


def _feature_and_error_cases(groups) -> None:
    cfg = SeqParConfig(sp_size=2, layout="zigzag")
    base = tiny_model("llama")
    check_case("llama/grad-checkpointing", base, cfg, groups, make_batch("packed"),
               prep=_checkpointed)
    lora_base = _lora(tiny_model("llama"))
    check_case("llama/lora", lora_base, cfg, groups, make_batch("pad"))
    for kind in ("pad", "packed"):  # no sp_doc_ids from the collator: derived in attention
        check_case(f"llama/derived-doc-ids/{kind}", base, cfg, groups, make_batch(kind),
                   derive=True)
    # load-time opt-in: register() first, then from_config(attn_implementation=...)
    register(cfg, groups)
    loaded = AutoModelForCausalLM.from_config(copy.deepcopy(base.config),
                                              attn_implementation=ATTN_NAME)
    loaded.load_state_dict(base.state_dict())
    assert loaded.config._attn_implementation == ATTN_NAME
    check_case("llama/from_config", loaded, cfg, groups, make_batch("packed"), ref_model=base)

    expect_error(ValueError, "attention_dropout", patch,
                 tiny_model("llama", attention_dropout=0.1), cfg, groups)
    expect_error(ValueError, "PreTrainedModel", patch, nn.Linear(2, 2), cfg, groups)
    expect_error(ValueError, "AttentionInterface", patch, _NoRoutingLM(LlamaConfig()), cfg,
                 groups)
    local = SPDataCollator(cfg, groups).shard(make_batch("plain"))

    model = tiny_model("llama")
    patch(model, cfg, groups)
    expect_error(ValueError, "position_ids", model, input_ids=local["input_ids"])
    per_shard = dict(local, position_ids=torch.arange(SEQ // 2).expand(2, -1))
    expect_error(ValueError, "restart at 0 on every SP rank", model, **per_shard)
    odd = {k: v[:, :7] for k, v in local.items() if v.dim() > 1}  # 14 tokens: not 4k
    expect_error(ValueError, "pad_to_multiple_of", model, **odd)
    model.train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    expect_error(ValueError, "dropout", model, **local)

    dil = SeqParConfig(sp_size=2, attention="dilated", layout="contiguous",
                       segment_lengths=[8, 16], dilation_rates=[1, 2])
    def rows(kind):
        return [dict(zip(make_batch(kind), row)) for row in zip(*make_batch(kind).values())]

    expect_error(ValueError, "packed documents", SPDataCollator(dil, groups), rows("packed"))
    dilated_model = tiny_model("llama")
    patch(dilated_model, dil, groups)
    # left padding (row 1) is visible to later real tokens: only right padding is accepted
    expect_error(ValueError, "right-padded rows", dilated_model,
                 **SPDataCollator(dil, groups)(rows("pad")))


def _dp_sampler_case(rank: int, world: int) -> None:
    """sp=2 x dp=2: the SP ranks of a group draw the same samples, DP groups different ones."""
    groups = sp_groups.initialize(2)
    cfg = SeqParConfig(sp_size=2, layout="zigzag")
    data = [dict(input_ids=torch.full((SEQ,), i), labels=torch.full((SEQ,), i))
            for i in range(8)]
    loader = shard_dataloader(data, cfg, groups, batch_size=2, seed=3)
    seen = torch.cat([b["input_ids"][:, 0] for b in loader])
    every = [torch.empty_like(seen) for _ in range(world)]
    dist.all_gather(every, seen)
    assert torch.equal(every[0], every[1]) and torch.equal(every[2], every[3])
    assert sorted(torch.cat([every[0], every[2]]).tolist()) == list(range(8))
    sp_groups.destroy()


def _world4(rank: int, world: int) -> None:
    _model_cases(rank, world)
    _dp_sampler_case(rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_models_match_single_process(world):
    run_distributed(_world4 if world == 4 else _model_cases, world, timeout=TIMEOUT_S)


# ---------------------------------------------------------------- Trainer

def _trainer_data(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (SEQ - 2,), generator=g)  # 14 tokens: the collator pads
        rows.append(dict(input_ids=ids, labels=ids.clone()))
    return rows


def _trainer_args(out: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
        use_cpu=True, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )


class _EpochLoader(DataLoader):
    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class _SameOrderTrainer(Trainer):
    """Single-process reference drawing samples in the order SPTrainer's DP sampler does."""

    def get_train_dataloader(self):
        sampler = DistributedSampler(self.train_dataset, num_replicas=1, rank=0, seed=0)
        return _EpochLoader(self.train_dataset, batch_size=2, sampler=sampler,
                            collate_fn=default_data_collator)


def _run_trainer(trainer_cls, out: str, **kw) -> tuple[list[float], dict]:
    model = tiny_model("llama")
    trainer = trainer_cls(model=model, args=_trainer_args(out), train_dataset=_trainer_data(),
                          **kw)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # numpy copies: tensors would travel back from a worker through shared memory that dies with it
    return losses, {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def _sp_trainer(rank: int, world: int, out: str):
    from seqpar_ring.integrations.hf_trainer import SPTrainer

    losses, params = _run_trainer(SPTrainer, f"{out}/r{rank}",
                                  sp_config=SeqParConfig(sp_size=2, layout="zigzag"))
    sp_groups.destroy()
    return losses, params


def test_trainer_matches_single_process():
    with tempfile.TemporaryDirectory() as out:
        ref_losses, ref_params = _run_trainer(_SameOrderTrainer, f"{out}/ref")
        results = run_distributed(_sp_trainer, 2, out, timeout=TIMEOUT_S)
    assert len(ref_losses) == 3
    for losses, params in results:
        assert len(losses) == len(ref_losses)
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= LOSS_RTOL * abs(b), f"logged losses {losses} vs {ref_losses}"
        for n, ref in ref_params.items():
            err = abs(params[n] - ref).max()
            assert err <= 1e-5 * abs(ref).max(), f"{n} after training: err {err:.3e}"
