"""SeqParConfig: validation messages name the key and the fix; dict round trip; divisor."""

import pytest

from seqpar_ring import SeqParConfig

DILATED = dict(attention="dilated", segment_lengths=[8, 16], dilation_rates=[1, 2])


def test_defaults_and_valid_configs():
    assert SeqParConfig() == SeqParConfig(sp_size=1, attention="ring", layout="zigzag")
    for layout in ("contiguous", "zigzag"):
        for comm in ("ring", "allgather"):
            for kernel in ("auto", "torch", "cudnn", "flash"):
                SeqParConfig(sp_size=4, layout=layout, comm=comm, kernel=kernel, bucket_size=64)
    cfg = SeqParConfig(sp_size=2, **DILATED)
    assert cfg.segment_lengths == (8, 16) and cfg.dilation_rates == (1, 2)  # lists -> tuples
    assert isinstance(SeqParConfig(comm_timeout_s=5).comm_timeout_s, float)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(sp_size=0), "sp_size"),
        (dict(sp_size=-2), "sp_size"),
        (dict(sp_size=2.0), "sp_size"),
        (dict(sp_size=True), "sp_size"),
        (dict(attention="dense"), "attention"),
        (dict(layout="striped"), "layout"),
        (dict(comm="nccl"), "comm"),
        (dict(kernel="xformers"), "kernel"),
        (dict(bucket_size=0), "bucket_size"),
        (dict(comm_timeout_s=0), "comm_timeout_s"),
        (dict(comm_timeout_s=float("inf")), "comm_timeout_s"),
        (dict(segment_lengths=[8], dilation_rates=[1]), "segment_lengths"),
        (dict(dilation_rates=[1]), "dilation_rates"),
        (dict(attention="dilated"), "segment_lengths"),
        (dict(attention="dilated", segment_lengths=[8]), "dilation_rates"),
        (dict(attention="dilated", segment_lengths=[], dilation_rates=[]), "segment_lengths"),
        (dict(attention="dilated", segment_lengths=[8, 16], dilation_rates=[1]), "dilation_rates"),
        (dict(attention="dilated", segment_lengths=[8], dilation_rates=[0]), "dilation_rates"),
        (dict(attention="dilated", segment_lengths=[0], dilation_rates=[1]), "segment_lengths"),
        (dict(attention="dilated", segment_lengths=[6], dilation_rates=[4]), "segment_lengths"),
        (dict(attention="dilated", segment_lengths="8", dilation_rates=[1]), "segment_lengths"),
    ],
)
def test_invalid_configs_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"sequence_parallel.{key}"):
        SeqParConfig(**kwargs)


def test_message_names_value_and_choices():
    with pytest.raises(ValueError) as err:
        SeqParConfig(attention="dense")
    assert "attention='dense'" in str(err.value) and "('ring', 'dilated')" in str(err.value)
    with pytest.raises(ValueError, match=r"w % r == 0"):
        SeqParConfig(attention="dilated", segment_lengths=[6], dilation_rates=[4])


def test_from_dict_round_trip_and_unknown_keys():
    for cfg in (SeqParConfig(), SeqParConfig(sp_size=4, layout="contiguous", bucket_size=32),
                SeqParConfig(sp_size=2, **DILATED)):
        d = cfg.to_dict()
        assert SeqParConfig.from_dict(d) == cfg
        assert d["segment_lengths"] is None or isinstance(d["segment_lengths"], list)
    with pytest.raises(ValueError) as err:
        SeqParConfig.from_dict({"sp_size": 2, "ring_size": 2, "layuot": "zigzag"})
    msg = str(err.value)
    assert "ring_size" in msg and "layuot" in msg and "sp_size" in msg  # unknown + valid keys
    with pytest.raises(ValueError, match="mapping"):
        SeqParConfig.from_dict([("sp_size", 2)])


def test_seq_len_divisor():
    assert SeqParConfig(sp_size=1).seq_len_divisor == 1  # one rank: the layout is the identity
    assert SeqParConfig(sp_size=4, layout="contiguous").seq_len_divisor == 4
    assert SeqParConfig(sp_size=4, layout="zigzag").seq_len_divisor == 8
    dilated = dict(attention="dilated", segment_lengths=[8, 12, 16], dilation_rates=[1, 3, 4])
    cfg = SeqParConfig(sp_size=2, **dilated)  # dilated: contiguous by default, its only layout
    assert cfg.layout == "contiguous" and cfg.seq_len_divisor == 2 * 12
    with pytest.raises(ValueError, match="contiguous layout only"):
        SeqParConfig(sp_size=2, layout="zigzag", **dilated)


@pytest.mark.parametrize("ds, match", [
    ({"sequence_parallel": False}, "must be a JSON object"),
    ({"sequence_parallel": {"size": None}}, r"sequence_parallel\.size is null"),
    ({"sequence_parallel": {"size": 2, "comm_timeout_s": 1e-9}}, "comm_timeout_s=1e-09 must be"),
])
def test_json_section_mistakes_are_refused(ds, match):
    from seqpar_ring.integrations.ds_config import split_config

    with pytest.raises(ValueError, match=match):
        split_config(ds)
