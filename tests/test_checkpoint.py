"""Native checkpoint format: round trip, bundled names, clear errors, no code execution."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from prott5nv.checkpoint import bundled_models, load_checkpoint, provenance, resolve, save_pretrained
from prott5nv.errors import CheckpointError
from prott5nv.model.config import preset
from prott5nv.model.t5 import T5Model
from prott5nv.tokenizer import ProteinTokenizer


def test_round_trip_identical_outputs(tmp_path, tiny_model, real_proteins):
    out = save_pretrained(tiny_model.model, tiny_model.tokenizer, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    model, tok = load_checkpoint(out)
    assert model.config == tiny_model.config and tok.tokens == tiny_model.tokenizer.tokens
    ids = torch.from_numpy(tok.encode(real_proteins[0][1]))[None]
    with torch.no_grad():
        torch.testing.assert_close(model.encode(ids), tiny_model.model.encode(ids), rtol=0, atol=0)
    # the tied word table is stored once
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "prott5nv" and cfg["model"]["d_model"] == 64


def test_convert_to_bfloat16_keeps_provenance(tmp_path, tiny_model):
    """`prott5nv convert --dtype bfloat16` (how the demo model is shipped): same weights in bf16, and the
    source's record of how it was made carried over, plus where it was converted from."""
    from prott5nv.cli import main

    src = save_pretrained(tiny_model.model, tiny_model.tokenizer, tmp_path / "run", extra={"trained_steps": 7})
    assert main(["convert", str(src), str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0
    assert provenance(tmp_path / "half") == {"trained_steps": 7, "converted_from": str(src)}
    model, _ = load_checkpoint(tmp_path / "half")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, tiny_model.model.state_dict()[k].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_bfloat16_storage_loads_as_float32(tmp_path, tiny_model):
    out = save_pretrained(tiny_model.model, tiny_model.tokenizer, tmp_path / "half", dtype=torch.bfloat16)
    model, _ = load_checkpoint(out)
    assert next(model.parameters()).dtype == torch.float32


def test_half_precision_load_holds_no_float32_copy(tmp_path, tiny_model, real_proteins):
    """Loading a float32 checkpoint in bfloat16 reads each tensor straight into bf16 (LayerNorm parameters
    stay float32): the weights equal the float32 load cast afterwards, and at no moment are more than a
    small share of the float32 weights alive (the old loader held all of them, then a bf16 copy)."""
    from conftest import LiveFloat32

    out = save_pretrained(tiny_model.model, tiny_model.tokenizer, tmp_path / "ckpt")
    full, _ = load_checkpoint(out)
    with LiveFloat32() as watch:
        half, _ = load_checkpoint(out, dtype=torch.bfloat16)
    float32_bytes = sum(p.numel() * 4 for p in full.parameters())
    norms = {n for n, p in half.named_parameters() if "norm" in n}
    assert norms and all(p.dtype == torch.float32 for n, p in half.named_parameters() if n in norms)
    for name, p in half.named_parameters():
        assert not p.is_meta and p.requires_grad
        expected = full.get_parameter(name)
        torch.testing.assert_close(p, expected if name in norms else expected.to(torch.bfloat16), rtol=0, atol=0)
    norm_bytes = sum(p.numel() * 4 for n, p in half.named_parameters() if n in norms)
    largest = max(p.numel() * 4 for p in full.parameters())
    assert watch.peak <= norm_bytes + 2 * largest < float32_bytes / 4  # the tensor read and the one before
    ids = torch.from_numpy(tiny_model.tokenizer.encode(real_proteins[0][1]))[None]
    with torch.no_grad():
        assert torch.isfinite(half.encode(ids).float()).all()


def test_overwrite_is_atomic_replacement(tmp_path, tiny_model):
    target = tmp_path / "ckpt"
    save_pretrained(tiny_model.model, tiny_model.tokenizer, target)
    torch.manual_seed(5)
    other = T5Model(preset("tiny"))
    save_pretrained(other, tiny_model.tokenizer, target)
    model, _ = load_checkpoint(target)
    torch.testing.assert_close(model.state_dict()["lm_head_bias"], other.state_dict()["lm_head_bias"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or .old directories left


def test_bundled_demo_resolves():
    assert "prott5nv-demo" in bundled_models()
    model, tok = load_checkpoint("prott5nv-demo")
    assert model.config.family == "megatron" and tok.layout == "prott5nv" and not model.training


def test_unknown_name_lists_bundled():
    with pytest.raises(CheckpointError, match=r"no model named or at 'nope' \(bundled models: .*prott5nv-demo"):
        resolve("nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_shape_mismatch_is_clear(tmp_path, tiny_model):
    out = save_pretrained(tiny_model.model, tiny_model.tokenizer, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["d_ff"] = 128
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"weight encoder.blocks.0.mlp.wi.weight has shape \(256, 64\)"):
        load_checkpoint(out)


def test_missing_weights_and_corrupt_file(tmp_path, tiny_model):
    out = save_pretrained(tiny_model.model, tiny_model.tokenizer, tmp_path / "ckpt")
    state = {k: v for k, v in tiny_model.model.state_dict().items() if k != "lm_head_bias"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: \['lm_head_bias'\]"):
        load_checkpoint(out)
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_checkpoint(out)


def test_newer_format_version_refused(tmp_path, tiny_model):
    out = save_pretrained(tiny_model.model, ProteinTokenizer(), tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        load_checkpoint(out)
