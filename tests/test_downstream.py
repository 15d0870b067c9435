"""Downstream predictors on real data: task files of every kind, frozen-feature heads (composition,
embeddings, cached), fine-tuning, saved predictors, metrics, CLI, errors naming file:line, and the
pretraining probe.

Data: tests/data/localization_600.csv.gz (real localization labels, see tests/data/README.md). The
per-residue tasks are derived deterministically from real Swiss-Prot sequences: a 3-class residue type
(hydrophobic `H` = AVILMFWC, charged `C` = DEKRH, other `P`) with the first and last 3 residues marked
unresolved, and Kyte-Doolittle hydropathy per residue; their per-protein counterpart is the GRAVY score
(mean hydropathy), a linear function of the amino-acid composition.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SWISSPROT, TEST_DATA

from prott5nv.cli import main
from prott5nv.downstream import FitOptions, finetune_task, load_predictor, load_task
from prott5nv.downstream.metrics import classification_metrics, rankdata, regression_metrics
from prott5nv.errors import ConfigError, ProtT5nvError
from prott5nv.fasta import read_fasta

LOCALIZATION = TEST_DATA / "localization_600.csv.gz"
KD = {"A": 1.8, "R": -4.5, "N": -3.5, "D": -3.5, "C": 2.5, "Q": -3.5, "E": -3.5, "G": -0.4, "H": -3.2,
      "I": 4.5, "L": 3.8, "K": -3.9, "M": 1.9, "F": 2.8, "P": -1.6, "S": -0.8, "T": -0.7, "W": -0.9, "Y": -1.3,
      "V": 4.2}  # Kyte-Doolittle hydropathy  # fmt: skip
RESIDUE_TYPE = {**dict.fromkeys("AVILMFWC", "H"), **dict.fromkeys("DEKRH", "C")}


def localization_rows() -> list[dict[str, str]]:
    with gzip.open(LOCALIZATION, "rt") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def swissprot_200() -> list[tuple[str, str]]:
    """The first 200 Swiss-Prot records of 30..300 standard residues."""
    out = []
    for r in read_fasta(SWISSPROT):
        if 30 <= len(r.sequence) <= 300 and set(r.sequence) <= set(KD):
            out.append((r.id, r.sequence))
        if len(out) == 200:
            return out
    raise AssertionError("not enough proteins")


def split_of(i: int) -> str:
    return "test" if i % 5 == 0 else "val" if i % 5 == 1 else "train"


@pytest.fixture(scope="module")
def residue_task(swissprot_200, tmp_path_factory) -> Path:
    """FLIP secondary-structure layout (sequence, 3state, resolved) with derived residue types."""
    path = tmp_path_factory.mktemp("ss") / "residue_types.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "sequence", "3state", "resolved", "split"])
        for i, (rid, seq) in enumerate(swissprot_200):
            labels = "".join(RESIDUE_TYPE.get(c, "P") for c in seq)
            w.writerow([rid, seq, labels, "000" + "1" * (len(seq) - 6) + "000", split_of(i)])
    return path


@pytest.fixture(scope="module")
def hydropathy_tasks(swissprot_200, tmp_path_factory) -> tuple[Path, Path]:
    """Per-residue Kyte-Doolittle values (TSV, comma separated) and per-protein GRAVY (no split column)."""
    d = tmp_path_factory.mktemp("kd")
    residue, protein = d / "kd.tsv", d / "gravy.csv"
    with open(residue, "w") as fr, open(protein, "w") as fp:
        fr.write("sequence\thydropathy\tsplit\n")
        fp.write("id,sequence,gravy\n")
        for i, (rid, seq) in enumerate(swissprot_200):
            fr.write(f"{seq}\t{','.join(str(KD[c]) for c in seq)}\t{split_of(i)}\n")
            fp.write(f"{rid},{seq},{np.mean([KD[c] for c in seq]):.4f}\n")
    return residue, protein


# ------------------------------------------------------------------------------------------- tasks
def test_localization_task_loads_with_splits_classes_and_lines():
    data = load_task(LOCALIZATION)
    rows = localization_rows()
    assert data.task.kind == "protein-classification" and data.task.targets == ["location"]
    assert data.counts() == {"train": 480, "val": 60, "test": 60}
    assert data.task.classes == sorted({r["location"] for r in rows if r["split"] == "train"})
    assert data.ids == [r["id"] for r in rows] and data.sequences == [r["sequence"] for r in rows]
    assert [data.task.classes[y] for y in data.labels] == [r["location"] for r in rows]
    assert data.where[0] == f"{LOCALIZATION}:2" and data.where[-1] == f"{LOCALIZATION}:601"


def test_task_kinds_are_inferred(residue_task, hydropathy_tasks):
    ss = load_task(residue_task)
    assert ss.task.kind == "residue-classification" and ss.task.classes == ["C", "H", "P"]
    first = ss.labels[0]
    assert (first[:3] == -1).all() and (first[-3:] == -1).all() and (first[3:-3] >= 0).all()
    kd = load_task(hydropathy_tasks[0])
    assert kd.task.kind == "residue-regression" and kd.labels[0][0] == KD[kd.sequences[0][0]]
    gravy = load_task(hydropathy_tasks[1], val_fraction=0.25, seed=1)
    assert gravy.task.kind == "protein-regression" and gravy.counts() == {"train": 150, "val": 50, "test": 0}
    assert gravy.splits == load_task(hydropathy_tasks[1], val_fraction=0.25, seed=1).splits  # seeded


def test_flip_set_and_validation_columns(tmp_path):
    """FLIP's own layout: `sequence,target,set,validation` with set train/test and validation True/False."""
    rows = localization_rows()
    flip = tmp_path / "scl.csv"
    flip.write_text("sequence,target,set,validation\n" + "".join(
        f"{r['sequence']},{r['location']},{'test' if r['split'] == 'test' else 'train'},{r['split'] == 'val'}\n"
        for r in rows))  # fmt: skip
    data = load_task(flip)
    assert data.task.targets == ["target"] and data.splits == [r["split"] for r in rows]


def test_fasta_with_label_table(tmp_path):
    rows = localization_rows()[:30]
    fasta, labels = tmp_path / "x.fasta", tmp_path / "labels.tsv"
    fasta.write_text("".join(f">{r['id']} description\n{r['sequence'][:60]}\n{r['sequence'][60:]}\n" for r in rows))
    labels.write_text("id\tlocation\n" + "".join(f"{r['id']}\t{r['location']}\n" for r in rows[::-1]))
    data = load_task(fasta, labels=labels, val_fraction=0.2)
    assert data.sequences == [r["sequence"] for r in rows]
    assert [data.task.classes[y] for y in data.labels] == [r["location"] for r in rows]
    assert data.where[1] == f"{fasta}:4"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: rows[3].__setitem__("3state", rows[3]["3state"][:-1]),
         ":5: 3state has {n} labels, the sequence {n1} residues"),
        (lambda rows: rows[6].__setitem__("3state", rows[6]["3state"][:4] + "X" + rows[6]["3state"][5:]),
         ":8: unknown class 'X' in 3state at position 5"),  # a val row: X is no training class
        (lambda rows: rows[2].__setitem__("resolved", rows[2]["resolved"].replace("0", "2", 1)),
         ":4: resolved may only contain 0 and 1"),
        (lambda rows: rows[4].__setitem__("split", "holdout"), ":6: split 'holdout' is not one of train, val, test"),
        (lambda rows: [r.__setitem__("split", "test") for r in rows], "the train split is empty"),
        (lambda rows: rows[5].__setitem__("sequence", rows[5]["sequence"][:10] + "J" + rows[5]["sequence"][11:]),
         ":7, record "),
    ],
)  # fmt: skip
def test_bad_rows_are_errors_naming_file_and_line(residue_task, tmp_path, mutate, message):
    with open(residue_task, newline="") as fh:
        rows = list(csv.DictReader(fh))
    mutate(rows)
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    n = len(rows[3]["3state"])
    with pytest.raises(ProtT5nvError) as err:
        load_task(bad)
    assert str(bad) in str(err.value) and message.format(n=n, n1=n + 1) in str(err.value)


def test_unknown_class_outside_training_and_ambiguous_target(tmp_path):
    rows = localization_rows()
    lines = ["id,sequence,location,split"] + [f"{r['id']},{r['sequence']},{r['location']},{r['split']}" for r in rows]
    lines[10] = lines[10].rsplit(",", 2)[0] + ",Peroxisome,test"  # no Peroxisome in the training rows
    bad = tmp_path / "loc.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProtT5nvError, match=r"loc.csv:11: unknown class 'Peroxisome' in location"):
        load_task(bad)
    two = tmp_path / "two.csv"
    two.write_text("sequence,a,b\n" + "".join(f"{r['sequence']},1,2\n" for r in rows[:5]))
    with pytest.raises(ProtT5nvError, match=r"several possible target columns \(a, b\); choose with --target"):
        load_task(two)
    assert load_task(two, target="b", val_fraction=0.4).task.kind == "protein-regression"


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_match_hand_computation():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert rankdata(np.array([10.0, 20.0, 10.0, 30.0])).tolist() == [1.5, 3.0, 1.5, 4.0]
    r = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 5.0]))
    assert r["spearman"] == pytest.approx(0.8) and r["rmse"] == pytest.approx(np.sqrt(3 / 4))


# ------------------------------------------------------------------------------ training and saving
def test_composition_baseline_cli_and_predict_round_trip(tmp_path, capsys):
    run = tmp_path / "comp"
    assert main(["finetune", str(LOCALIZATION), "--features", "composition", "--head", "linear", "-o", str(run),
                 "--threads", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    report = json.loads((run / "metrics.json").read_text())
    test = report["metrics"]["test"]
    majority = max(np.bincount([y for y, s in zip(*_labels_splits(), strict=True) if s == "test"])) / 60
    assert test["n"] == 60 and test["accuracy"] >= majority  # composition is at least the majority baseline
    assert f"test: accuracy {test['accuracy']:.4f}" in out
    assert sum(map(sum, test["confusion_matrix"])) == 60
    assert (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG" and (run / "learning_curves.png").exists()
    pred = tmp_path / "pred.csv"
    assert main(["predict", str(run), str(LOCALIZATION), "-o", str(pred)]) == 0
    with open(pred) as fh:
        got = list(csv.DictReader(fh))
    truth = localization_rows()
    test_rows = [(g, t) for g, t in zip(got, truth, strict=True) if t["split"] == "test"]
    acc = np.mean([g["location"] == t["location"] for g, t in test_rows])
    assert acc == pytest.approx(test["accuracy"])  # the saved predictor reproduces the reported metric
    predictor = load_predictor(run)
    assert predictor.predict([t["sequence"] for _, t in test_rows[:5]]) == [g["location"] for g, _ in test_rows[:5]]


def _labels_splits() -> tuple[list[int], list[str]]:
    data = load_task(LOCALIZATION)
    return data.labels, data.splits


def test_frozen_embeddings_are_cached_and_predictor_checks_its_model(tiny_model, tmp_path, monkeypatch):
    from prott5nv.api import ProtT5nv

    cache = tmp_path / "cache"
    options = FitOptions(head="mlp", max_epochs=5, patience=2)
    first = finetune_task(LOCALIZATION, tmp_path / "a", model=tiny_model, options=options, cache_dir=cache,
                          max_train=120, max_eval=40)  # fmt: skip
    assert first.counts == {"train": 120, "val": 40, "test": 40}
    calls = []
    original = ProtT5nv.tokens_to_hiddens
    monkeypatch.setattr(ProtT5nv, "tokens_to_hiddens",
                        lambda self, t, *a: calls.append(len(t)) or original(self, t, *a))  # fmt: skip
    second = finetune_task(LOCALIZATION, tmp_path / "b", model=tiny_model, options=options, cache_dir=cache,
                           max_train=120, max_eval=40)  # fmt: skip
    assert calls == [] and second.metrics == first.metrics  # every embedding came from the cache
    predictor = load_predictor(tmp_path / "a", model=tiny_model)
    seqs = load_task(LOCALIZATION).sequences[:7]
    direct = tiny_model.seqs_to_embedding(seqs).numpy()
    cached = predictor.featurizer.per_protein(seqs)
    assert np.allclose(direct, cached, atol=1e-6)
    assert calls  # this predictor has no cache: computed
    torch.manual_seed(0)
    other = ProtT5nv(type(tiny_model.model)(tiny_model.config), tiny_model.tokenizer)
    with pytest.raises(ProtT5nvError, match="is not the one this predictor was trained on"):
        load_predictor(tmp_path / "a", model=other)


def test_residue_classification_q3_over_resolved_mask(residue_task, tiny_model, tmp_path):
    summary = finetune_task(residue_task, tmp_path / "onehot", features="onehot",
                            options=FitOptions(head="linear", lr=1e-2, batch_size=16))  # fmt: skip
    test = summary.metrics["test"]
    data = load_task(residue_task)
    resolved = sum(len(s) - 6 for s, sp in zip(data.sequences, data.splits, strict=True) if sp == "test")
    assert test["n"] == resolved and test["q3"] == test["accuracy"] == 1.0  # the letters determine the type
    emb = finetune_task(residue_task, tmp_path / "cnn", model=tiny_model,
                        options=FitOptions(head="cnn", max_epochs=3))  # fmt: skip
    assert emb.metrics["test"]["n"] == resolved and 0.0 < emb.metrics["test"]["q3"] <= 1.0
    preds = load_predictor(tmp_path / "cnn", model=tiny_model).predict(data.sequences[:3])
    assert [len(p) for p in preds] == [len(s) for s in data.sequences[:3]] and set("".join(preds)) <= set("CHP")


def test_regression_tasks_learn_hydropathy(hydropathy_tasks, tmp_path):
    residue, protein = hydropathy_tasks
    kd = finetune_task(residue, tmp_path / "kd", features="onehot", options=FitOptions(head="linear", lr=1e-2))
    assert kd.metrics["test"]["spearman"] > 0.99 and kd.metrics["test"]["rmse"] < 0.1
    gravy = finetune_task(protein, tmp_path / "gravy", features="composition",
                          options=FitOptions(head="linear", lr=1e-2))  # fmt: skip
    assert gravy.metrics["val"]["spearman"] > 0.95
    pred = load_predictor(tmp_path / "gravy").predict(["MKTAYIAKQRQISFVKSHFSRQ"])[0]
    assert pred == pytest.approx(np.mean([KD[c] for c in "MKTAYIAKQRQISFVKSHFSRQ"]), abs=0.3)


def test_finetuning_updates_only_top_layers_and_saves_the_encoder(tiny_model, tmp_path):
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    options = FitOptions(head="linear", finetune=True, unfreeze_layers=1, max_epochs=1, max_steps=3, lr=1e-3,
                         batch_size=16)  # fmt: skip
    summary = finetune_task(LOCALIZATION, tmp_path / "ft", model=tiny_model, options=options, max_train=48,
                            max_eval=16, max_length=128, long_policy="truncate")  # fmt: skip
    assert summary.mode == "finetuned" and summary.metrics["test"]["n"] == 16
    assert all(torch.equal(v, tiny_model.model.state_dict()[k]) for k, v in before.items())  # caller's model kept
    predictor = load_predictor(tmp_path / "ft", long_policy="truncate")  # proteins past 128: refused by default
    tuned = predictor.model.model.state_dict()
    assert predictor.model.config.num_decoder_layers == 0  # only the encoder is saved
    changed = {k.split(".")[2] if k.startswith("encoder.blocks.") else k
               for k in tuned if not torch.equal(tuned[k], before[k])}  # fmt: skip
    assert changed == {"1", "encoder.final_layer_norm.weight", "encoder.final_layer_norm.bias"}
    seqs = load_task(LOCALIZATION).sequences[:4]
    assert predictor.predict(seqs) == load_predictor(tmp_path / "ft", long_policy="truncate").predict(seqs)


def test_the_head_reads_the_layer_asked_for_frozen_or_finetuned(tiny_model, tiny_checkpoint, tmp_path, capsys):
    """--layer K: frozen features are layer K's (cached under their own key, recorded in the predictor);
    fine-tuning trains the blocks below layer K only. The tiny model has 2 blocks: -2 is layer 1."""
    run = tmp_path / "frozen"
    assert main(["finetune", str(LOCALIZATION), "--model", str(tiny_checkpoint), "--layer", "-2", "--head", "linear",
                 "--max-epochs", "2", "--max-train", "40", "--max-eval", "20", "--cache-dir", str(tmp_path / "cache"),
                 "-o", str(run), "--threads", "1"]) == 0  # fmt: skip
    features = json.loads((run / "predictor.json").read_text())["features"]
    assert features["layer"] == 1 and features["fingerprint"].endswith("-layer1")
    assert [p.name.endswith("-layer1") for p in (tmp_path / "cache").iterdir()] == [True]
    predictor = load_predictor(run, model=tiny_model)
    seqs = load_task(LOCALIZATION).sequences[:5]
    np.testing.assert_allclose(predictor.featurizer.per_protein(seqs),
                               tiny_model.seqs_to_embedding(seqs, layers=1).numpy(), atol=1e-6)  # fmt: skip
    assert main(["finetune", str(LOCALIZATION), "--features", "composition", "--layer", "1", "-o",
                 str(tmp_path / "c")]) == 2  # fmt: skip
    assert "--layer picks an encoder layer; composition features use no encoder" in capsys.readouterr().err
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    options = FitOptions(head="linear", finetune=True, unfreeze_layers=1, max_epochs=1, max_steps=3, lr=1e-3,
                         batch_size=16)  # fmt: skip
    finetune_task(LOCALIZATION, tmp_path / "ft", model=tiny_model, options=options, max_train=48, max_eval=16,
                  max_length=128, long_policy="truncate", layer=1)  # fmt: skip
    assert json.loads((tmp_path / "ft" / "predictor.json").read_text())["features"]["layer"] == 1
    tuned = load_predictor(tmp_path / "ft", long_policy="truncate")
    assert tuned.layer == 1
    state = tuned.model.model.state_dict()
    changed = {k.split(".")[2] if k.startswith("encoder.blocks.") else k
               for k in state if not torch.equal(state[k], before[k])}  # fmt: skip
    assert changed == {"0"}  # block 1 (index 0) is the top block below layer 1; block 2 and the norm take no part


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["finetune", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "r")]) == 2
    assert "missing.csv: cannot open: No such file or directory" in capsys.readouterr().err
    assert main(["finetune", str(LOCALIZATION), "--features", "composition", "--head", "cnn", "-o",
                 str(tmp_path / "r")]) == 2  # fmt: skip
    assert "the cnn head is for per-residue tasks" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_plots_are_skipped_without_matplotlib(tmp_path, monkeypatch):
    from prott5nv.downstream import plots

    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    summary = finetune_task(LOCALIZATION, tmp_path / "r", features="composition",
                            options=FitOptions(head="linear", max_epochs=2))  # fmt: skip
    assert summary.plots == [] and "plots skipped" in summary.lines()[-1]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["plots"].startswith("skipped")
    assert not list((tmp_path / "r").glob("*.png"))


# ------------------------------------------------------------------------------ pretraining probe
def test_pretraining_probe_logs_rows(tmp_path):
    from prott5nv.data.preprocess import PreprocessConfig, preprocess
    from prott5nv.downstream.probe import PretrainProbe
    from prott5nv.train.config import TrainConfig
    from prott5nv.train.trainer import Pretrainer

    data = tmp_path / "store"
    preprocess([SWISSPROT], data, PreprocessConfig(max_length=64, val=8, test=0, seed=3))
    probe = tmp_path / "probe.csv"
    probe.write_text("sequence,location\n" + "".join(f"{r['sequence']},{r['location']}\n"
                                                   for r in localization_rows()[:150]))  # fmt: skip
    settings = dict(data=str(data), preset="tiny", max_steps=4, micro_batch_size=4, seq_length=64, seq_length_dec=24,
                    val_every=4, val_samples=8, save_every=4, log_every=2, device="cpu", threads=1)  # fmt: skip
    rows = {}
    with pytest.raises(ConfigError, match="probe_task needs a probe"):  # the trainer never imports downstream
        Pretrainer(TrainConfig(out=str(tmp_path / "no"), **settings, probe_task=str(probe)))
    for name, probing in (("probed", {"probe_task": str(probe), "probe_every": 2}), ("plain", {})):
        cfg = TrainConfig(out=str(tmp_path / name), **settings, **probing)
        # as `prott5nv pretrain --probe-task` does: the CLI builds the probe and passes it in
        trainer = Pretrainer(cfg, probe=PretrainProbe(cfg.probe_task, seed=cfg.seed) if cfg.probe_task else None)
        trainer.train()
        assert trainer.model.training
        rows[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows["probed"] if "probe_accuracy" in r]
    assert [r["step"] for r in probes] == [0, 2, 4]  # step 0: the untrained network, before any update
    from prott5nv.train.trainer import build_model

    cfg = TrainConfig(out=str(tmp_path / "x"), **settings)
    torch.manual_seed(cfg.seed)
    untrained, tok = build_model(cfg)
    step0 = PretrainProbe(probe, seed=cfg.seed)(untrained.train(), tok)
    assert {k: probes[0][k] for k in step0} == step0
    assert all(0.0 <= r["probe_accuracy"] <= 1.0 and 0.0 <= r["probe_macro_f1"] <= 1.0 for r in probes)
    # probing changes nothing in the training run (RNG state and train mode restored)
    losses = {name: [r["loss"] for r in rs if "loss" in r] for name, rs in rows.items()}
    assert losses["probed"] == losses["plain"] and len(losses["plain"]) == 2


def test_composition_is_the_mean_of_onehot_rows(swissprot_200):
    from prott5nv.downstream.features import OneHotFeaturizer

    f = OneHotFeaturizer()
    seqs = [s for _, s in swissprot_200[:20]]
    comp = f.per_protein(seqs)
    assert np.allclose(comp, np.stack([r.mean(0) for r in f.per_residue(seqs)]))
    assert comp[0][f._lut[ord(seqs[0][0])]] == pytest.approx(seqs[0].count(seqs[0][0]) / len(seqs[0]))


# ---------------------------------------------- baselines: dipeptide, one-hot windows, the step-0 model
FLIP_SS = TEST_DATA / "flip_ss_200.csv.gz"  # 120 train / 30 valid / 50 test (NEW364) rows of FLIP "sampled"


def flip_ss_rows() -> list[dict[str, str]]:
    with gzip.open(FLIP_SS, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


def test_dipeptide_features_on_a_real_peptide():
    from prott5nv.downstream.features import DipeptideFeaturizer

    seq = "KIIGIDLGTTNSXVA"  # Swiss-Prot P83709 (a 15-residue fragment with an X)
    f = DipeptideFeaturizer().per_protein([seq])[0]
    std = "ACDEFGHIKLMNPQRSTVWY"
    assert f.shape == (420,) and f.dtype == np.float32
    expected = {"K": 1, "I": 3, "G": 2, "D": 1, "L": 1, "T": 2, "N": 1, "S": 1, "V": 1, "A": 1}  # X: no column
    assert f[:20] == pytest.approx([expected.get(c, 0) / 15 for c in std])
    pairs = ["KI", "II", "IG", "GI", "ID", "DL", "LG", "GT", "TT", "TN", "NS", "VA"]  # SX, XV: no column
    want = np.zeros(400)
    for a, b in pairs:
        want[std.index(a) * 20 + std.index(b)] = 1 / 14  # 14 neighbour pairs in 15 residues
    assert f[20:] == pytest.approx(want)


def test_onehot_window_features_on_a_real_peptide():
    from prott5nv.downstream.features import OneHotWindowFeaturizer, make_featurizer

    seq = "GQDFMRF"  # Swiss-Prot B3EWJ8
    x = OneHotWindowFeaturizer().per_residue([seq])[0]
    assert x.shape == (7, 15 * 25)  # W = 7: residues i-7 .. i+7, 25 letters each
    # residue 0 (G): blocks 0..6 are before the start (zero), block 7 is G itself, blocks 8..13 are QDFMRF,
    # block 14 is past the end; letter index in ACDEFGHIKLMNPQRSTVWYXBZUO: G 5, Q 13, D 2, F 4, M 10, R 14
    assert np.flatnonzero(x[0]).tolist() == [7 * 25 + 5, 8 * 25 + 13, 9 * 25 + 2, 10 * 25 + 4, 11 * 25 + 10,
                                             12 * 25 + 14, 13 * 25 + 4]  # fmt: skip
    assert np.flatnonzero(x[6]).tolist() == [1 * 25 + 5, 2 * 25 + 13, 3 * 25 + 2, 4 * 25 + 4, 5 * 25 + 10,
                                             6 * 25 + 14, 7 * 25 + 4]  # fmt: skip
    assert x.sum(1).tolist() == [7] * 7  # every residue sees the whole peptide
    small = make_featurizer("onehot-window", window=1).per_residue([seq])[0]
    onehot = make_featurizer("onehot").per_residue([seq])[0]
    assert small.shape == (7, 75) and np.array_equal(small[:, 25:50], onehot)  # the centre block is `onehot`
    assert np.array_equal(small[1:, :25], onehot[:-1]) and not small[0, :25].any()  # the left neighbour


def test_flip_ss_masked_residues_are_not_scored_and_the_window_probe_beats_the_majority(tmp_path):
    rows = flip_ss_rows()
    data = load_task(FLIP_SS, target="ss3", mask_column="mask")
    assert data.task.kind == "residue-classification" and data.task.classes == ["C", "E", "H"]
    assert data.counts() == {"train": 120, "val": 30, "test": 50}  # FLIP's "valid" is the val split
    for r, y in zip(rows, data.labels, strict=True):  # mask 0 -> label -1, else the ss3 letter
        assert "".join("-" if v < 0 else "CEH"[v] for v in y) == "".join(
            c if m == "1" else "-" for c, m in zip(r["ss3"], r["mask"], strict=True))  # fmt: skip
    test_rows = [r for r in rows if r["split"] == "test"]
    scored = sum(r["mask"].count("1") for r in test_rows)
    assert scored < sum(len(r["sequence"]) for r in test_rows)  # some test residues are unobserved
    summary = finetune_task(FLIP_SS, tmp_path / "win", features="onehot-window", target="ss3", mask_column="mask",
                            options=FitOptions(head="linear", lr=1e-3, max_epochs=20, patience=3))  # fmt: skip
    test = summary.metrics["test"]
    assert test["n"] == scored and sum(map(sum, test["confusion_matrix"])) == scored
    train_labels = np.concatenate([y for y, s in zip(data.labels, data.splits, strict=True) if s == "train"])
    majority = int(np.bincount(train_labels[train_labels >= 0]).argmax())
    letter = "CEH"[majority]
    majority_q3 = sum(sum(c == letter and m == "1" for c, m in zip(r["ss3"], r["mask"], strict=True))
                      for r in test_rows) / scored  # fmt: skip
    assert test["q3"] > majority_q3 + 0.1, (test["q3"], majority_q3)
    saved = json.loads((tmp_path / "win" / "predictor.json").read_text())["features"]
    assert saved == {"type": "onehot-window", "window": 7}
    preds = load_predictor(tmp_path / "win").predict([r["sequence"] for r in test_rows[:3]])
    assert [len(p) for p in preds] == [len(r["sequence"]) for r in test_rows[:3]] and set("".join(preds)) <= set("CEH")


def test_per_residue_scoring_past_the_length_limit_truncated_or_chunked(tiny_model):
    from prott5nv.downstream.features import EmbeddingFeaturizer
    from prott5nv.downstream.training import fit_frozen
    from prott5nv.inference.chunking import chunk_starts, stitch

    data = load_task(FLIP_SS, target="ss3", mask_column="mask")
    data = data.subset([i for i, s in enumerate(data.splits) if s != "train"] + list(range(20)))
    limit, opts = 64, FitOptions(head="linear", max_epochs=1)
    test = [i for i, s in enumerate(data.splits) if s == "test"]
    cut = fit_frozen(data, EmbeddingFeaturizer(tiny_model, max_length=limit), opts).metrics["test"]
    assert cut["n"] == sum(int((data.labels[i][:limit] >= 0).sum()) for i in test)  # the first 64 residues
    chunked = EmbeddingFeaturizer(tiny_model, max_length=limit, chunk_overlap=16)
    assert chunked.describe()["chunk_overlap"] == 16
    whole = fit_frozen(data, chunked, opts).metrics["test"]
    assert whole["n"] == sum(int((data.labels[i] >= 0).sum()) for i in test)  # every scored residue
    seq = max(data.sequences, key=len)
    starts = chunk_starts(len(seq), limit, 16)
    hiddens, _ = tiny_model.seqs_to_hiddens([seq[a : a + limit] for a in starts])
    want = stitch([h.numpy().astype(np.float16) for h in hiddens], starts, len(seq))
    got = chunked.per_residue([seq])[0]
    assert len(starts) > 2 and got.shape == (len(seq), tiny_model.embedding_dim) and np.array_equal(got, want)
    assert chunked.per_protein([seq])[0] == pytest.approx(want.astype(np.float32).mean(0), abs=1e-6)


def test_untrained_copy_is_the_same_network_reinitialised(tiny_checkpoint, tmp_path):
    from prott5nv.api import load
    from prott5nv.checkpoint import load_checkpoint, provenance
    from prott5nv.downstream import save_untrained
    from prott5nv.downstream.features import model_fingerprint

    out = save_untrained(tiny_checkpoint, tmp_path / "step0", seed=3)
    trained, untrained = load(tiny_checkpoint), load(out)
    assert untrained.config == trained.config and untrained.tokenizer.to_dict() == trained.tokenizer.to_dict()
    assert provenance(out)["source"] == str(tiny_checkpoint) and provenance(out)["seed"] == 3
    net, _ = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(3)
    net.reset_parameters()
    state = untrained.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    trained_state = trained.model.state_dict()
    assert not any(torch.equal(state[k], trained_state[k]) for k in state if k.endswith(("qkv.weight", "wi.weight")))
    assert model_fingerprint(untrained) != model_fingerprint(trained)  # no embedding-cache collision
    again = load(save_untrained(tiny_checkpoint, tmp_path / "again", seed=3))
    assert model_fingerprint(again) == model_fingerprint(untrained)  # deterministic per seed


def test_dipeptide_cli_and_feature_kind_errors(tmp_path, capsys):
    run = tmp_path / "dp"
    assert main(["finetune", str(LOCALIZATION), "--features", "dipeptide", "--head", "linear", "-o", str(run),
                 "--threads", "1", "--max-epochs", "20"]) == 0  # fmt: skip
    report = json.loads((run / "metrics.json").read_text())
    assert report["metrics"]["test"]["n"] == 60 and load_predictor(run).featurizer.dim == 420
    seqs = [r["sequence"] for r in localization_rows()[:3]]
    assert len(load_predictor(run).predict(seqs)) == 3
    capsys.readouterr()
    args = ["--features", "dipeptide", "-o", str(tmp_path / "r")]
    assert main(["finetune", str(FLIP_SS), "--target", "ss3", *args]) == 2
    assert "dipeptide features are per protein" in capsys.readouterr().err
    assert main(["finetune", str(LOCALIZATION), "--features", "onehot-window", "-o", str(tmp_path / "r")]) == 2
    assert "onehot-window features are per residue" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
