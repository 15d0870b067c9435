"""LoRA fine-tuning (peft, the `lora` extra) on real tasks: only the adapters and the head train, the
encoder's weights stay as they were, a predictor keeps only the adapters and the head and predicts the
same after a save/load round trip, and `convert --merge-lora` folds the adapters into a native checkpoint
that computes what base + adapters compute.

Data: tests/data/localization_600.csv.gz (per protein) and tests/data/flip_ss_200.csv.gz (per residue,
FLIP secondary structure), real proteins (tests/data/README.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TEST_DATA
from safetensors.torch import load_file

import prott5nv
from prott5nv.cli import main
from prott5nv.downstream import FitOptions, load_predictor, load_task
from prott5nv.downstream.predictor import Predictor, merge_lora
from prott5nv.downstream.run import subsample
from prott5nv.downstream.training import fit_finetune
from prott5nv.errors import CheckpointError, ConfigError

LOCALIZATION = TEST_DATA / "localization_600.csv.gz"
FLIP_SS = TEST_DATA / "flip_ss_200.csv.gz"


def base_name(key: str) -> str:
    """The native key of a weight wrapped by peft (``...qkv.base_layer.weight`` -> ``...qkv.weight``)."""
    return key.replace(".base_layer.", ".")


def test_lora_trains_only_adapters_and_the_saved_predictor_predicts_the_same(tiny_model, tmp_path):
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    data = subsample(load_task(LOCALIZATION), 0, train=48, val=16, test=16)
    opts = FitOptions(head="mlp", lora=True, lora_rank=4, lora_alpha=8, max_epochs=2, max_steps=6, lr=1e-2,
                      batch_size=16)  # fmt: skip
    result = fit_finetune(data, tiny_model, opts, max_length=128)
    tuned = result.encoder.state_dict()
    adapters = {k for k in tuned if ".lora_" in k}
    cfg = tiny_model.config
    # rank-4 A and B on the fused qkv (64 -> 192) and on o (64 -> 64) of both encoder blocks; the decoder has none
    assert len(adapters) == 2 * 2 * 2 and all(k.startswith("encoder.blocks.") for k in adapters)
    n_adapter = cfg.num_layers * 4 * ((64 + 192) + (64 + 64))
    assert result.trainable == n_adapter + sum(p.numel() for p in result.head.parameters())
    # every encoder weight is bit-for-bit the base's; the caller's model is untouched
    for key, value in tuned.items():
        if ".lora_" not in key:
            assert torch.equal(value, before[base_name(key)]), key
    assert all(torch.equal(v, tiny_model.model.state_dict()[k]) for k, v in before.items())
    trained_b = [v for k, v in tuned.items() if ".lora_B." in k]
    assert all(v.abs().max() > 0 for v in trained_b)  # B starts at zero: the adapters did train

    tuned_model = prott5nv.ProtT5nv(result.encoder, tiny_model.tokenizer, name="model")
    lora = {"model": "", "fingerprint": _fingerprint(tiny_model), **opts.lora_spec()}
    predictor = Predictor(data.task, result.head, model=tuned_model, max_length=128, lora=lora)
    run = tmp_path / "run"
    run.mkdir()
    predictor.save_into(run, {"mode": "lora"})
    saved = load_file(str(run / "adapters.safetensors"))
    assert set(saved) == {k.replace(".default", "") for k in adapters}  # the adapters, nothing of the base
    base_bytes = sum(v.numel() * v.element_size() for k, v in before.items() if not k.startswith("decoder."))
    assert (run / "adapters.safetensors").stat().st_size < 0.1 * base_bytes
    assert not (run / "model").exists()
    assert json.loads((run / "predictor.json").read_text())["features"]["type"] == "lora"

    loaded = load_predictor(run, model=tiny_model, long_policy="truncate")
    seqs = [s for s, split in zip(data.sequences, data.splits, strict=True) if split == "test"]
    preds, probs = predictor.predict_encoded(seqs)
    preds2, probs2 = loaded.predict_encoded(seqs)
    assert preds == preds2
    assert all(np.array_equal(a, b) for a, b in zip(probs, probs2, strict=True))


def _fingerprint(model) -> str:
    from prott5nv.downstream.features import model_fingerprint

    return model_fingerprint(model)


def test_lora_cli_per_residue_predict_and_merge(tiny_checkpoint, tmp_path, capsys):
    run, merged = tmp_path / "ss", tmp_path / "merged"
    args = ["finetune", str(FLIP_SS), "--target", "ss3", "--mask-column", "mask", "--model", str(tiny_checkpoint),
            "--lora", "--lora-rank", "4", "--lora-targets", "q,k,v,o,wi,wo", "--head", "cnn", "--max-train", "24",
            "--max-eval", "8", "--max-epochs", "1", "--max-steps", "4", "--lr", "1e-2", "--truncate",
            "--max-length", "128", "-o", str(run)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test: accuracy" in out and "(lora, " in out
    assert sorted(p.name for p in run.iterdir() if p.suffix != ".png") == [
        "adapters.safetensors", "head.safetensors", "metrics.json", "predictor.json"]  # fmt: skip
    report = json.loads((run / "metrics.json").read_text())
    assert report["mode"] == "lora" and report["options"]["lora_targets"] == "q,k,v,o,wi,wo"
    assert main(["predict", str(run), str(FLIP_SS), "-o", str(tmp_path / "ss.csv"), "--truncate"]) == 0
    assert "predicted 200 proteins" in capsys.readouterr().out

    assert main(["convert", str(run), str(merged), "--merge-lora"]) == 0
    base = prott5nv.load(tiny_checkpoint)
    with_adapters = load_predictor(run, long_policy="truncate").model  # base + adapters, not merged
    plain = prott5nv.load(merged)
    assert json.loads((merged / "config.json").read_text())["extra"]["lora"]["rank"] == 4
    seqs = load_task(FLIP_SS, target="ss3", mask_column="mask").sequences[:6]
    seqs = [s[:128] for s in seqs]
    a, mask = with_adapters.tokens_to_hiddens(with_adapters.encode(seqs))
    b, _ = plain.tokens_to_hiddens(plain.encode(seqs))
    c, _ = base.tokens_to_hiddens(base.encode(seqs))
    m = mask[..., None]
    torch.testing.assert_close(b * m, a * m, rtol=1e-5, atol=1e-5)
    assert (c * m - a * m).abs().max() > 1e-3  # the adapters change the encoder
    merged_state, base_state = plain.model.state_dict(), base.model.state_dict()
    assert merged_state.keys() == base_state.keys()  # a plain native checkpoint, decoder included
    changed = {k for k in base_state if not torch.equal(merged_state[k], base_state[k])}
    assert changed and all(k.startswith("encoder.blocks.") and k.endswith(".weight") for k in changed)
    assert {k.split(".")[-2] for k in changed} == {"qkv", "o", "wi", "wo"}


def test_lora_errors_are_one_line(tiny_checkpoint, tiny_model, tmp_path, capsys):
    common = ["finetune", str(LOCALIZATION), "--model", str(tiny_checkpoint), "-o", str(tmp_path / "r")]
    assert main([*common, "--lora", "--finetune"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main([*common, "--lora", "--lora-targets", "q,v"]) == 2
    err = capsys.readouterr().err
    assert "q, k and v are one fused projection" in err and "Traceback" not in err
    assert main([*common, "--lora", "--lora-targets", "mlp"]) == 2
    assert "choose from q, k, v, qkv, o, wi, wo" in capsys.readouterr().err
    assert main([*common, "--lora", "--features", "composition"]) == 2
    assert "use --features embeddings" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # a LoRA predictor refuses a base model with other weights; merging needs a LoRA run
    with pytest.raises(ConfigError, match="lora_rank"):
        FitOptions(lora=True, lora_rank=0)
    run = tmp_path / "comp"
    assert main(["finetune", str(LOCALIZATION), "--features", "composition", "--head", "linear", "--max-epochs",
                 "1", "-o", str(run)]) == 0  # fmt: skip
    with pytest.raises(ConfigError, match="not a LoRA predictor"):
        merge_lora(run)


def test_lora_predictor_checks_its_base_model(tiny_model, tiny_checkpoint, tmp_path):
    run = tmp_path / "loc"
    assert main(["finetune", str(LOCALIZATION), "--model", str(tiny_checkpoint), "--lora", "--head", "linear",
                 "--max-train", "16", "--max-eval", "8", "--max-epochs", "1", "--max-steps", "1", "--truncate",
                 "--max-length", "64", "-o", str(run)]) == 0  # fmt: skip
    other = prott5nv.load("prott5nv-demo")
    with pytest.raises(CheckpointError, match="not the one these LoRA adapters were trained on"):
        load_predictor(run, model=other)
    assert load_predictor(run, model=tiny_model, long_policy="truncate").predict(["MKTAYIAKQRQISFVKSHFSRQ"])
