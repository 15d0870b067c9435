"""Tokenizer id tables against docs/vocabulary.md, and the input policy of docs/inputs.md."""

from __future__ import annotations

import numpy as np
import pytest

from prott5nv.errors import ConfigError, InvalidSequenceError
from prott5nv.sequence import SequencePolicy, clean_sequence
from prott5nv.tokenizer import ProteinTokenizer

# docs/vocabulary.md (ProtT5nv), written out independently of the implementation.
SPEC_PROTT5NV = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "<pad>", 4: "<mask>", 5: "L", 6: "A", 7: "S", 8: "G", 9: "V",
    10: "E", 11: "R", 12: "T", 13: "D", 14: "I", 15: "P", 16: "K", 17: "N", 18: "F", 19: "Q", 20: "Y",
    21: "H", 22: "M", 23: "C", 24: "W", 25: "X", 26: "B", 27: "Z", 28: "U", 29: "O", 30: "<cls>", 31: "<sep>",
}  # fmt: skip
# docs/vocabulary.md (Rostlab)
SPEC_ROSTLAB = {
    0: "<pad>", 1: "</s>", 2: "<unk>", 3: "A", 4: "L", 5: "G", 6: "V", 7: "S", 8: "R", 9: "E", 10: "D",
    11: "T", 12: "I", 13: "P", 14: "K", 15: "F", 16: "Q", 17: "N", 18: "Y", 19: "M", 20: "H", 21: "W",
    22: "C", 23: "X", 24: "B", 25: "O", 26: "U", 27: "Z",
}  # fmt: skip


def test_prott5nv_id_table_matches_spec():
    tok = ProteinTokenizer()
    for i, piece in SPEC_PROTT5NV.items():
        assert tok.tokens[i] == piece
        assert tok.token_to_id(piece) == i
    assert tok.vocab_size == 128
    assert tok.sentinel_ids == list(range(32, 128))
    assert tok.token_to_id("<extra_id_0>") == 32 and tok.token_to_id("<extra_id_95>") == 127
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.unk_id) == (3, 1, 2, 4, 0)
    # every residue letter has its own id, no special tokens around the encoder input
    assert tok.encode("LASGVERTDIPKNFQYHMCWXBZUO").tolist() == list(range(5, 30))


def test_prott5nv_collapsed_sentinels_map_to_unk():
    tok = ProteinTokenizer(sentinels="collapsed")
    assert tok.vocab_size == 128  # 32 pieces padded to a multiple of 128
    assert set(tok.sentinel_ids) == {0} and not tok.has_distinct_sentinels


def test_rostlab_id_table_matches_spec():
    tok = ProteinTokenizer.for_layout("rostlab")
    for i, piece in SPEC_ROSTLAB.items():
        assert tok.tokens[i] == piece
    assert tok.vocab_size == 128
    for n in (0, 1, 99):
        assert tok.token_to_id(f"<extra_id_{n}>") == 127 - n
    # U Z O B become X, and </s> is appended
    assert tok.encode("MUZOBA").tolist() == [19, 23, 23, 23, 23, 3, 1]
    assert tok.num_special_suffix == 1


def test_vocab_padding_multiple():
    tok = ProteinTokenizer(num_sentinels=10)
    assert tok.vocab_size == 128 and len(tok.tokens) == 128
    tok = ProteinTokenizer(num_sentinels=100, make_vocab_size_divisible_by=64)
    assert tok.vocab_size == 192


def test_case_whitespace_and_stop_symbol():
    tok = ProteinTokenizer()
    ref = tok.encode("MKTAYIAK").tolist()
    assert tok.encode("mktAYiak").tolist() == ref
    assert tok.encode("MKT AYI\tAK\n").tolist() == ref
    assert tok.encode("MKTAYIAK*").tolist() == ref


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("MKT*AY", "stop symbol '*' inside the sequence (only a single trailing '*' is allowed) at position 4"),
        ("MKTJAY", "unknown residue 'J' (use --unknown-to-x to map unknown letters to X) at position 4"),
        ("MK-TAY", "alignment gap '-' (use --strip-gaps to remove gaps) at position 3"),
        ("MK1TAY", "invalid character '1' at position 3"),
        ("MKTAYé", "invalid character 'é' at position 6"),  # as written, not upper-cased
        ("MKıAY", "invalid character 'ı' at position 3"),  # str.upper() would make it a valid 'I'
        ("MKTAß", "invalid character 'ß' at position 5"),  # ... and this 'SS'
        ("  \n", "empty sequence"),
        ("*", "empty sequence"),
    ],
)
def test_bad_sequences_name_record_and_position(raw, message):
    with pytest.raises(InvalidSequenceError) as err:
        ProteinTokenizer().encode(raw, "sp|P1|X")
    assert str(err.value) == f"record 'sp|P1|X': {message}"


def test_lenient_policies():
    assert clean_sequence("MK-T.AY", policy=SequencePolicy(strip_gaps=True)) == "MKTAY"
    assert clean_sequence("MKJTAY", policy=SequencePolicy(unknown_to_x=True)) == "MKXTAY"
    with pytest.raises(InvalidSequenceError, match="invalid character '1'"):
        clean_sequence("MK1", policy=SequencePolicy(unknown_to_x=True))


def test_decode_round_trip_and_description_round_trip():
    tok = ProteinTokenizer()
    seq = "MKTAYIAKQRQISFVKSHFSRQ"
    ids = tok.encode(seq)
    assert tok.decode(ids) == seq
    assert tok.decode(np.array([32, 6, 2]), skip_special_tokens=False) == "<extra_id_0>A</s>"
    again = ProteinTokenizer.from_dict(tok.to_dict())
    assert again.tokens == tok.tokens and again.sentinel_ids == tok.sentinel_ids


def test_unknown_layout_is_config_error():
    with pytest.raises(ConfigError, match="unknown tokenizer layout 'bert'"):
        ProteinTokenizer(layout="bert")
