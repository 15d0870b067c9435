"""One length policy (refuse / truncate / chunk) for every command, and one source for every default:
flag help texts from the config dataclasses, one precision vocabulary, structured error fields."""

from __future__ import annotations

import argparse
import csv
import re

import numpy as np
import pytest

from prott5nv.cli import main
from prott5nv.errors import ConfigError, InvalidSequenceError, SequenceTooLongError
from prott5nv.inference.length import LengthPolicy, resolve
from prott5nv.sequence import clean_sequence


# ------------------------------------------------------------------------------------------ the policy
def test_policy_resolves_once_from_the_model_and_applies_each_mode():
    assert resolve(512).limit == 512 and resolve(None).limit is None
    assert resolve(512, 64).limit == 64
    with pytest.raises(ConfigError, match="--max-length 600 exceeds the model's maximum of 512 residues"):
        resolve(512, 600)
    with pytest.raises(ConfigError, match="--max-residues 0 must be positive|--max-residues must be positive"):
        resolve(512, 0, flag="--max-residues")
    with pytest.raises(ConfigError, match="unknown long-protein policy 'cut'"):
        resolve(512, mode="cut")
    with pytest.raises(ConfigError, match="--chunk-overlap must be in"):
        resolve(512, 64, "chunk", chunk_overlap=64)
    seq = "M" * 100
    assert LengthPolicy(64, "truncate").cut(seq) == "M" * 64 and LengthPolicy(64, "refuse").cut(seq) == seq
    chunk = resolve(512, 64, "chunk", chunk_overlap=16)
    assert chunk.window == 64 and chunk.starts(100)[0] == 0 and chunk.starts(50) == [0]
    assert chunk.check(["a", "b"], [100, 10]) == 1
    with pytest.raises(SequenceTooLongError, match=r"f.fa: 1 protein\(s\) longer than 64 residues: a \(100\); use "):
        LengthPolicy(64).check(["a", "b"], [100, 10], source="f.fa")


# --------------------------------------------------------------------------------- finetune / predict
def _task(path, rng) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "sequence", "label", "split"])
        for i in range(24):
            seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=int(rng.integers(30, 80))))
            w.writerow([f"p{i}", seq, "ab"[i % 2], ("train", "train", "val", "test")[i % 4]])


def test_finetune_and_predict_refuse_long_proteins_unless_truncated_or_chunked(tiny_checkpoint, tmp_path, capsys):
    task = tmp_path / "task.csv"
    _task(task, np.random.default_rng(0))
    base = ["finetune", str(task), "--model", str(tiny_checkpoint), "--head", "linear", "--max-epochs", "1",
            "--no-cache", "--threads", "1", "--max-length", "40"]  # fmt: skip
    assert main([*base, "-o", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "protein(s) longer than 40 residues" in err and "--truncate" in err
    assert not (tmp_path / "refused").exists()
    for how in (["--truncate"], ["--chunk", "--chunk-overlap", "10"]):
        run = tmp_path / how[0].strip("-")
        assert main([*base, *how, "-o", str(run)]) == 0
        out = tmp_path / f"{run.name}.csv"
        assert main(["predict", str(run), str(task), "-o", str(out), "--no-cache"]) == 2  # refuse by default
        assert "protein(s) longer than 40 residues" in capsys.readouterr().err and not out.exists()
        assert main(["predict", str(run), str(task), "-o", str(out), "--no-cache", *how[:1]]) == 0
        with open(out) as fh:
            assert len(list(csv.DictReader(fh))) == 24
    with pytest.raises(SystemExit):  # one way at a time
        main([*base, "--truncate", "--chunk", "-o", str(tmp_path / "both")])


def test_finetuning_the_encoder_refuses_chunks(tiny_checkpoint, tmp_path, capsys):
    task = tmp_path / "task.csv"
    _task(task, np.random.default_rng(1))
    assert main(["finetune", str(task), "--model", str(tiny_checkpoint), "--finetune", "--max-length", "40",
                 "--chunk", "--chunk-overlap", "10", "-o", str(tmp_path / "ft")]) == 2  # fmt: skip
    assert "use --truncate, not --chunk" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- defaults
def _parser(command: str) -> argparse.ArgumentParser:
    from prott5nv.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _help_defaults(command: str) -> dict[str, str]:
    out = {}
    for action in _parser(command)._actions:
        m = re.search(r"\(default: ([^)]*)\)$", action.help or "")
        if m:
            out[action.dest] = m.group(1)
    return out


def test_every_pretrain_flag_help_states_the_dataclass_default():
    from prott5nv.cli.common import default_text
    from prott5nv.cli.pretrain import FLAGS
    from prott5nv.train.config import TrainConfig

    stated = _help_defaults("pretrain")
    defaults = TrainConfig()
    for name, _, help_ in FLAGS:
        value = getattr(defaults, name)
        if value is None or value == "":
            continue  # computed from other settings (described in words) or required
        if "default" in help_:
            pytest.fail(f"--{name}: its help restates the default by hand")
        else:
            assert stated[name] == default_text(value), name
    assert stated["precision"] == "float32" and stated["seq_length"] == "512" and stated["lr"] == "0.0001"


def test_finetune_flag_help_states_the_fit_options_default():
    from prott5nv.cli.common import default_text
    from prott5nv.cli.finetune import FIT_FLAGS
    from prott5nv.data.batching import DEFAULT_BATCH_TOKENS
    from prott5nv.downstream.options import FitOptions

    stated = _help_defaults("finetune")
    for name, _, _ in FIT_FLAGS:
        value = getattr(FitOptions(), name)
        if value is not None:  # None: computed (lr, hidden) -- described in words
            assert stated[name] == default_text(value), name
    assert stated["dropout"] == "0.25" and stated["batch_size"] == "64"
    for command in ("finetune", "predict", "embed", "score", "serve"):
        assert _parser(command).get_default("batch_tokens") == DEFAULT_BATCH_TOKENS


@pytest.mark.parametrize(("given", "canonical"), [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32")])
def test_one_precision_vocabulary_with_aliases(given, canonical):
    from prott5nv.cli.pretrain import build_config
    from prott5nv.train.config import TrainConfig

    assert TrainConfig(precision=given).precision == canonical
    args = _parser("pretrain").parse_args(["--precision", given])
    args.config, args.model_override = None, []
    assert build_config(args).precision == canonical
    assert _parser("embed").parse_args(["x.fa", "-o", "y.h5", "--dtype", given]).dtype == canonical
    assert _parser("embed").parse_args(["x.fa", "-o", "y.h5", "--dtype", "auto"]).dtype == "auto"
    with pytest.raises(ConfigError, match="precision 'fp8': choose one of fp32, bf16, fp16"):
        TrainConfig(precision="fp8")


def test_bf16_alias_loads_a_bfloat16_model():
    import torch

    from prott5nv.device import resolve_dtype

    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32


def test_sequence_errors_carry_record_and_position():
    with pytest.raises(InvalidSequenceError) as exc:
        clean_sequence("MKTJA", "p1")
    assert (exc.value.record, exc.value.position) == ("p1", 4)
    with pytest.raises(InvalidSequenceError) as exc:
        clean_sequence("", "p2")
    assert (exc.value.record, exc.value.position) == ("p2", None)


def test_server_limits_take_the_length_policy():
    from prott5nv.inference.length import UNBOUNDED_FALLBACK
    from prott5nv.serve.limits import RequestError, ServeLimits, check_sequences

    assert ServeLimits().resolved(512).max_residues == 512
    assert ServeLimits().resolved(None).max_residues == UNBOUNDED_FALLBACK
    assert ServeLimits(max_residues=100).resolved(512).max_residues == 100
    with pytest.raises(ConfigError, match="--max-residues 600 exceeds the model's maximum of 512 residues"):
        ServeLimits(max_residues=600).resolved(512)
    limits = ServeLimits().resolved(512)
    with pytest.raises(RequestError) as exc:
        check_sequences(["a", "b"], ["MKT", "MK-T"], lambda s, rid: clean_sequence(s, rid), limits)
    assert exc.value.where == {"id": "b", "index": 1, "position": 3}
