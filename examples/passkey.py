"""Data for the examples: a synthetic passkey-retrieval task and packed rows of your own text.

Passkey retrieval (the long-context test of Mohtashami & Jaggi, 2023): a random number is
hidden at a random depth of a long filler text and the model must repeat it at the end::

    ^ywxx...xwyz k[A7][B3][C9][D1] wzyx...yxw ?A7B3C9D1
    |  filler   |      needle      |  filler  | question + answer (loss on the 4 digits only)

A tiny vocabulary keeps it learnable by a small model with random weights in a few minutes of
CPU: filler is drawn from 4 letters, and each digit of the key is hidden as ONE token that
also names its slot ("[A7]": slot A holds 7). Answering slot A is then a single attention
lookup: from the question's "A", find the needle token of slot A and copy its digit, wherever
the needle sits. Nothing but attention across the whole row can answer it: with sequence
parallelism the needle and the question usually live on different ranks.

Chance accuracy: 1/10 per digit, 10**-digits for the whole key.
"""

from __future__ import annotations

import json
import os
import random
from typing import Iterable

import torch
from torch.utils.data import Dataset

# Token id = index in VOCAB. "_" pads, "^" starts a row, "k" opens the needle, "?" asks.
SLOTS, DIGITS, FILLER = "ABCDEFGH", "0123456789", "wxyz"
NEEDLE = [f"[{s}{d}]" for s in SLOTS for d in DIGITS]  # slot + digit in one token
VOCAB = list("_^k?" + SLOTS + DIGITS + FILLER) + NEEDLE
PAD, BOS, KEY, ASK = 0, 1, 2, 3
STOI = {c: i for i, c in enumerate(VOCAB)}
IGNORE = -100


def encode(tokens: Iterable[str]) -> list[int]:
    return [STOI[t] for t in tokens]


def decode(ids: Iterable[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def passkey_sample(seq_len: int, digits: int, depth: float, rng: random.Random) -> dict:
    """One row of exactly ``seq_len`` tokens with the needle at ``depth`` in [0, 1] of the filler.

    Returns ``input_ids`` and ``labels`` (``(seq_len,)`` int64; labels are the input ids on
    the answer digits and -100 elsewhere: the model learns only to answer), plus the key.
    """
    if not 1 <= digits <= len(SLOTS):
        raise ValueError(f"passkey digits={digits} must be in 1..{len(SLOTS)}")
    key = "".join(rng.choice(DIGITS) for _ in range(digits))
    needle = ["k"] + [f"[{s}{d}]" for s, d in zip(SLOTS, key)]
    question = ["?"] + [c for s, d in zip(SLOTS, key) for c in (s, d)]
    n_fill = seq_len - 1 - len(needle) - len(question)
    if n_fill < 1:
        raise ValueError(f"seq_len={seq_len} is too short for a {digits}-digit passkey")
    before = round(depth * n_fill)
    fill = "".join(rng.choice(FILLER) for _ in range(n_fill))
    ids = torch.tensor(encode(["^", *fill[:before], *needle, *fill[before:], *question]))
    labels = torch.full_like(ids, IGNORE)
    answer = torch.arange(seq_len - 2 * digits + 1, seq_len, 2)  # the digit after each slot
    labels[answer] = ids[answer]
    return {"input_ids": ids, "labels": labels, "passkey": key, "depth": depth}


def passkey_batch(size: int, seq_len: int, digits: int = 4, seed: int = 0,
                  depths: list[float] | None = None) -> dict:
    """``size`` passkey rows drawn with torch at once (long rows: no per-token Python).

    The same rows as `passkey_sample` (layout, labels, uniform filler and keys) from another
    random stream: ``seed`` seeds a ``torch.Generator``. ``depths``: one needle depth per row
    (None: uniform). Returns ``input_ids`` and ``labels`` ``(size, seq_len)`` int64 and
    ``depth`` ``(size,)``.
    """
    if not 1 <= digits <= len(SLOTS):
        raise ValueError(f"passkey digits={digits} must be in 1..{len(SLOTS)}")
    n_fill = seq_len - 1 - (1 + digits) - (1 + 2 * digits)
    if n_fill < 1:
        raise ValueError(f"seq_len={seq_len} is too short for a {digits}-digit passkey")
    if depths is not None and len(depths) != size:
        raise ValueError(f"depths has {len(depths)} values for {size} rows")
    g = torch.Generator().manual_seed(seed)
    filler = torch.tensor(encode(FILLER))
    ids = filler[torch.randint(len(FILLER), (size, seq_len), generator=g)]
    ids[:, 0] = BOS
    key = torch.randint(len(DIGITS), (size, digits), generator=g)
    depth = (torch.rand(size, generator=g, dtype=torch.float64) if depths is None
             else torch.tensor(depths, dtype=torch.float64))
    slots = torch.arange(digits)
    needle = torch.cat([torch.full((size, 1), KEY), STOI[NEEDLE[0]] + slots * 10 + key], 1)
    start = 1 + torch.round(depth * n_fill).long()  # round half to even, like round()
    rows = torch.arange(size)[:, None]
    ids[rows, start[:, None] + torch.arange(1 + digits)] = needle
    slot_ids = torch.tensor(encode(SLOTS[:digits]))
    question = torch.stack([slot_ids.expand(size, digits), STOI[DIGITS[0]] + key], 2)
    ids[:, seq_len - 2 * digits - 1] = ASK
    ids[:, seq_len - 2 * digits:] = question.reshape(size, 2 * digits)
    labels = torch.full_like(ids, IGNORE)
    answer = torch.arange(seq_len - 2 * digits + 1, seq_len, 2)
    labels[:, answer] = ids[:, answer]
    return {"input_ids": ids, "labels": labels, "depth": depth}


class PasskeyDataset(Dataset):
    """``size`` rows, deterministic per ``seed``; ``depths`` fixes the needle depths (cycled)
    for evaluation, otherwise each row draws a uniform depth."""

    def __init__(self, size: int, seq_len: int, digits: int = 4, seed: int = 0,
                 depths: list[float] | None = None):
        self.size, self.seq_len, self.digits, self.seed, self.depths = (
            size, seq_len, digits, seed, depths)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + i)
        depth = self.depths[i % len(self.depths)] if self.depths else rng.random()
        row = passkey_sample(self.seq_len, self.digits, depth, rng)
        return {"input_ids": row["input_ids"], "labels": row["labels"]}

    def depth_of(self, i: int) -> float:
        return self.depths[i % len(self.depths)] if self.depths else float("nan")


class TextPasskeyDataset(PasskeyDataset):
    """The passkey task in words for a real model's tokenizer (``--model``): filler sentences,
    "The pass key is 7391. Remember it." at the given depth, and at the end "What is the pass
    key? The pass key is" followed by the answer tokens (the only labelled ones)."""

    FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back. "

    def __init__(self, tokenizer, size: int, seq_len: int, digits: int = 4, seed: int = 0,
                 depths: list[float] | None = None):
        super().__init__(size, seq_len, digits, seed, depths)
        self.tok = tokenizer
        self.fill = self._ids(self.FILLER * 8)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + i)
        depth = self.depths[i % len(self.depths)] if self.depths else rng.random()
        key = "".join(rng.choice(DIGITS) for _ in range(self.digits))
        needle = self._ids(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        question = self._ids(" What is the pass key? The pass key is")
        answer = self._ids(f" {key}")
        n_fill = self.seq_len - len(self.bos) - len(needle) - len(question) - len(answer)
        if n_fill < 1:
            raise ValueError(f"seq_len={self.seq_len} is too short for the passkey text")
        fill = (self.fill * (n_fill // len(self.fill) + 1))[:n_fill]
        before = round(depth * n_fill)
        ids = torch.tensor(self.bos + fill[:before] + needle + fill[before:] + question + answer)
        labels = torch.full_like(ids, IGNORE)
        labels[-len(answer):] = ids[-len(answer):]
        return {"input_ids": ids, "labels": labels}


# --- your own data: documents packed into rows ---------------------------------------------

def read_documents(path: str) -> list[str]:
    """``.jsonl``: one JSON object per line with a ``"text"`` field; ``.txt``: plain text,
    documents separated by blank lines. Anything else, or bytes that are not UTF-8 text, is
    refused with the file name and the first bad offset (ValueError)."""
    fmt = ("give a .jsonl (one {\"text\": ...} per line) or a .txt (documents separated by "
           "blank lines), UTF-8")
    if not os.path.isfile(path):
        raise ValueError(f"--data {path!r} is not a file: {fmt}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".txt"):
        raise ValueError(f"--data {path!r}: a {ext or 'extension-less'} file is not read as "
                         f"text: {fmt}")
    with open(path, "rb") as f:
        raw = f.read()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ValueError(f"--data {path!r} is binary (a NUL byte at offset {nul}): {fmt}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path!r} is not UTF-8 text: byte 0x{raw[e.start]:02x} at "
                         f"offset {e.start}: {fmt}") from None
    if ext == ".jsonl":
        docs = [_jsonl_text(path, i, line) for i, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    else:
        docs = [d.strip() for d in text.split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"--data {path!r} holds no documents")
    return docs


def _jsonl_text(path: str, line_no: int, line: str) -> str:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"--data {path!r} line {line_no}: not JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise ValueError(f"--data {path!r} line {line_no}: want an object with a string "
                         "\"text\" field")
    return doc["text"]


def min_row_len(digits: int) -> int:
    """The shortest row `passkey_sample` and `passkey_batch` can build: BOS, the needle
    (1 + digits), the question (1 + 2 digits) and one filler token."""
    return 1 + (1 + digits) + (1 + 2 * digits) + 1


def byte_tokenize(text: str) -> list[int]:
    """Tokenizer of the random tiny model for your own data: UTF-8 bytes, ids 2..257 (0 pad,
    1 begins a document)."""
    return [1] + [b + 2 for b in text.encode("utf-8")]


BYTE_VOCAB = 258


class PackedDataset(Dataset):
    """Documents concatenated into rows of ``seq_len`` tokens (the last partial row dropped).

    ``position_ids`` restart at 0 at every document start, which is how the SP collator and
    the ring attention know where documents end: no token attends across a document border.
    A document longer than the remaining row continues on the next row (positions restart).
    """

    def __init__(self, token_lists: list[list[int]], seq_len: int):
        ids, pos = [], []
        for toks in token_lists:
            ids += toks
            pos += range(len(toks))
        rows = len(ids) // seq_len
        if rows == 0:
            raise ValueError(f"the data has {len(ids)} tokens, fewer than one row of "
                             f"--seq-len {seq_len}: lower --seq-len or add data")
        self.ids = torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)
        p = torch.tensor(pos[: rows * seq_len]).view(rows, seq_len)
        self.pos = p - p[:, :1] * (p[:, :1] > 0) * _first_doc_mask(p)  # row starts at 0

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "position_ids": self.pos[i], "labels": self.ids[i]}


def _first_doc_mask(p: torch.Tensor) -> torch.Tensor:
    """1 on the tokens of each row's first (continued) document, 0 after its first restart."""
    restart = torch.zeros_like(p, dtype=torch.bool)
    restart[:, 1:] = p[:, 1:] != p[:, :-1] + 1
    return (restart.long().cumsum(1) == 0).long()
