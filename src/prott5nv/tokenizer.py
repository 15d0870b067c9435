"""Protein vocabularies: ProtT5nv's (BioNeMo SentencePiece + NeMo specials) and Rostlab's HF ProtT5.

One residue = one token. The tokenizer works on cleaned sequences (see :mod:`prott5nv.sequence`); raw
strings pass through :func:`~prott5nv.sequence.clean_sequence` first, so case, whitespace and a trailing
`*` are handled the same everywhere.

ProtT5nv layout (docs/vocabulary.md): ids 0-29 are the SentencePiece pieces, `<cls>` 30, `<sep>` 31, sentinels
`<extra_id_0..95>` 32-127 (``sentinels="distinct"``) -- or, as NeMo >= 1.13 built it for this
character-level model, every sentinel collapsed onto `<unk>` 0 (``sentinels="collapsed"``). The
encoder input has no BOS/EOS.

Rostlab layout (docs/vocabulary.md): `<pad>` 0, `</s>` 1, `<unk>` 2, residues by frequency from 3, and
`<extra_id_N>` = 127 - N. U, Z, O (and B by default) are mapped to X, and the encoder input ends with `</s>`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CheckpointError, ConfigError, InvalidSequenceError
from .sequence import DEFAULT_POLICY, RESIDUES, SequencePolicy, clean_sequence

PROTT5NV_PIECES = (
    "<unk>", "<s>", "</s>", "<pad>", "<mask>",
    "L", "A", "S", "G", "V", "E", "R", "T", "D", "I", "P", "K", "N", "F", "Q", "Y", "H", "M", "C", "W",
    "X", "B", "Z", "U", "O",
)  # fmt: skip
ROSTLAB_PIECES = (
    "<pad>", "</s>", "<unk>",
    "A", "L", "G", "V", "S", "R", "E", "D", "T", "I", "P", "K", "F", "Q", "N", "Y", "M", "H", "W", "C",
    "X", "B", "O", "U", "Z",
)  # fmt: skip

LAYOUTS = ("prott5nv", "rostlab")
_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")


def pad_to_multiple(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


@dataclass
class ProteinTokenizer:
    """Maps residues to ids and back for one of the two vocabulary layouts.

    The description (:meth:`to_dict`) is saved next to every checkpoint as `tokenizer.json`.
    """

    layout: str = "prott5nv"
    sentinels: str = "distinct"  # prott5nv only: "distinct" (ids 32-127) or "collapsed" (all -> <unk>)
    num_sentinels: int = 96
    rare_to_x: str = ""  # residues replaced by X before encoding (rostlab default "UZOB")
    make_vocab_size_divisible_by: int = 128
    tokens: list[str] = field(init=False, repr=False)
    sentinel_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.layout == "prott5nv":
            if self.sentinels not in ("distinct", "collapsed"):
                raise ConfigError(f"unknown sentinel layout {self.sentinels!r} (distinct or collapsed)")
            tokens = list(PROTT5NV_PIECES) + ["<cls>", "<sep>"]
            if self.sentinels == "distinct":
                self.sentinel_ids = list(range(len(tokens), len(tokens) + self.num_sentinels))
                tokens += [f"<extra_id_{i}>" for i in range(self.num_sentinels)]
            else:
                self.sentinel_ids = [0] * self.num_sentinels
            self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id = 3, 1, 2, 0, 4
            self.decoder_start_id = self.bos_id
            self.add_eos = False
        elif self.layout == "rostlab":
            tokens = list(ROSTLAB_PIECES)
            base = pad_to_multiple(len(tokens) + self.num_sentinels, self.make_vocab_size_divisible_by)
            tokens += [f"<pad_{i}>" for i in range(base - len(tokens))]
            # <extra_id_N> = vocab - 1 - N: the last ids, counting down (HF T5Tokenizer convention).
            self.sentinel_ids = [base - 1 - i for i in range(self.num_sentinels)]
            for n, i in enumerate(self.sentinel_ids):
                tokens[i] = f"<extra_id_{n}>"
            self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id = 0, None, 1, 2, None
            self.decoder_start_id = self.pad_id
            self.add_eos = True
        else:
            raise ConfigError(f"unknown tokenizer layout {self.layout!r}; choose one of {LAYOUTS}")
        #: ids below this are the tokenizer's own tokens; the rest (up to `vocab_size`) only pad the embedding
        #: table to a multiple of `make_vocab_size_divisible_by` (NeMo's ``tokenizer.vocab_size`` vs its
        #: padded vocabulary): decoding never emits them.
        self.real_vocab_size = len(tokens)
        self.vocab_size = pad_to_multiple(len(tokens), self.make_vocab_size_divisible_by)
        tokens += [f"<unused_{i}>" for i in range(self.vocab_size - len(tokens))]
        self.tokens = tokens
        self._ids = {t: i for i, t in enumerate(tokens) if not t.startswith("<unused_")}
        self._rare_table = str.maketrans({c: "X" for c in self.rare_to_x})
        lut = np.full(256, -1, dtype=np.int64)
        for ch in RESIDUES:
            lut[ord(ch)] = self._ids[ch.translate(self._rare_table)]
        self._lut = lut
        self.residue_ids = sorted({int(v) for v in lut if v >= 0})

    # ------------------------------------------------------------------ construction / description
    @classmethod
    def for_layout(cls, layout: str) -> ProteinTokenizer:
        """The default tokenizer of a layout (Rostlab: 100 sentinels, U Z O B -> X)."""
        if layout == "rostlab":
            return cls(layout="rostlab", num_sentinels=100, rare_to_x="UZOB")
        return cls(layout=layout)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "sentinels": self.sentinels,
            "num_sentinels": self.num_sentinels,
            "rare_to_x": self.rare_to_x,
            "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
            "vocab_size": self.vocab_size,
            "special_ids": self.special_ids,
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProteinTokenizer:
        tok = cls(
            layout=d.get("layout", "prott5nv"),
            sentinels=d.get("sentinels", "distinct"),
            num_sentinels=int(d.get("num_sentinels", 96)),
            rare_to_x=d.get("rare_to_x", ""),
            make_vocab_size_divisible_by=int(d.get("make_vocab_size_divisible_by", 128)),
        )
        if "tokens" in d and list(d["tokens"]) != tok.tokens:
            raise ConfigError("tokenizer description does not match its layout (tokens differ)")
        return tok

    @property
    def special_ids(self) -> dict[str, int | None]:
        return {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id,
                "mask": self.mask_id, "decoder_start": self.decoder_start_id}  # fmt: skip

    @property
    def has_distinct_sentinels(self) -> bool:
        return len(set(self.sentinel_ids)) == len(self.sentinel_ids)

    # ------------------------------------------------------------------ encoding
    def encode_residues(self, seq: str, record_id: str | None = None) -> np.ndarray:
        """Ids of an already-cleaned upper-case sequence (no special tokens)."""
        codes = np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)
        ids = self._lut[codes]
        if (ids < 0).any():
            pos = int(np.argmax(ids < 0))
            who = f"record '{record_id}': " if record_id is not None else ""
            raise InvalidSequenceError(f"{who}invalid character {seq[pos]!r} at position {pos + 1}",
                                       record=record_id, position=pos + 1)  # fmt: skip
        return ids

    def encode(
        self,
        seq: str,
        record_id: str | None = None,
        policy: SequencePolicy = DEFAULT_POLICY,
        *,
        add_special_tokens: bool = True,
    ) -> np.ndarray:
        """Clean `seq` (docs/inputs.md) and return its encoder input ids (int64). With `add_special_tokens`,
        Rostlab models get their trailing `</s>`; ProtT5nv input never has BOS/EOS."""
        ids = self.encode_residues(clean_sequence(seq, record_id, policy), record_id)
        if add_special_tokens and self.add_eos:
            ids = np.append(ids, self.eos_id)
        return ids

    @property
    def num_special_suffix(self) -> int:
        """How many special tokens :meth:`encode` appends (positions to drop from per-residue output)."""
        return 1 if self.add_eos else 0

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        """Residue string of `ids`; special tokens are dropped (or shown as their pieces)."""
        out = []
        for i in np.asarray(ids).tolist():
            tok = self.tokens[i] if 0 <= i < len(self.tokens) else "<unk>"
            if len(tok) == 1:
                out.append(tok)
            elif not skip_special_tokens:
                out.append(tok)
        return "".join(out)

    def token_to_id(self, token: str) -> int:
        m = _SENTINEL_RE.fullmatch(token)
        if m and int(m.group(1)) < self.num_sentinels:
            return self.sentinel_ids[int(m.group(1))]
        if token not in self._ids:
            raise KeyError(f"unknown token {token!r}")
        return self._ids[token]

    def sentinel(self, n: int) -> int:
        return self.sentinel_ids[n]


def require_distinct_sentinels(tokenizer: ProteinTokenizer, task: str) -> None:
    """Refuse `task` (e.g. "score", "generate") when the tokenizer's sentinels all share one id.

    With the collapsed layout (NeMo >= 1.13) every ``<extra_id_N>`` is ``<unk>``: the model was never told
    which masked span is which, so span infilling, per-span scoring and sentinel-driven generation are
    meaningless. Embeddings (encoder hidden states of unmasked proteins) are unaffected.
    """
    if tokenizer.has_distinct_sentinels:
        return
    raise CheckpointError(
        f"{task}: this checkpoint's tokenizer maps all {tokenizer.num_sentinels} sentinel tokens "
        "<extra_id_N> onto <unk> (the layout NeMo >= 1.13 builds for ProtT5nv), so the model cannot tell "
        f"masked spans apart and {task} would give meaningless results. Embeddings still work. If you know "
        "the checkpoint was trained with distinct sentinel ids 32-127 (NeMo <= 1.12), load it with "
        "--sentinels distinct on the command line, or prott5nv.load(path, sentinels='distinct') / "
        "load_nemo(path, sentinels='distinct') in Python."
    )
