"""Hugging Face T5 directories (Rostlab ProtT5, ProstT5, ...) to and from the ``t5`` family.

An HF T5 directory holds ``config.json`` and the weights as ``model.safetensors`` or ``pytorch_model.bin``
(either possibly sharded with a ``*.index.json``). Weights are read with safetensors or
``torch.load(weights_only=True)``: no code runs. One table of key rules (:func:`hf_rules`) serves both
directions: import concatenates HF's separate ``q``/``k``/``v`` into our fused projections, export splits
them again.

HF conventions handled here:

* ``shared.weight`` is the word table; ``encoder.embed_tokens.weight`` / ``decoder.embed_tokens.weight``
  are aliases of it (older files store them, transformers 5 does not).
* The relative position bias lives in block 0 of each stack and is reused by every layer.
* ``tie_word_embeddings`` (absent = True) means the LM head is the word table applied to the decoder output
  scaled by ``d_model**-0.5``; False means a separate, unscaled ``lm_head.weight``.
* An encoder-only checkpoint (``T5EncoderModel``) has no ``decoder.*`` weights: ``num_decoder_layers = 0``.

The tokenizer is the Rostlab layout (``ProteinTokenizer.for_layout('rostlab')``: U Z O B -> X, a trailing
``</s>``) unless the directory carries a ``prott5nv_tokenizer.json`` written by :func:`save_hf`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from ..fsutil import atomic_directory
from ..model.config import T5Config
from ..model.t5 import T5Model
from ..tokenizer import ROSTLAB_PIECES, ProteinTokenizer
from ._common import (
    CHECKPOINT_FILES,
    HF_TOKENIZER_FILE,
    KeyRule,
    LazyTensors,
    apply_rules,
    empty_model,
    load_state_dict_strict,
)
from .sentencepiece import read_pieces

log = logging.getLogger(__name__)

TOKENIZER_NAME = HF_TOKENIZER_FILE
# our activation -> HF feed_forward_proj
ACT_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "gated-gelu": "gated-gelu",
             "gated-relu": "gated-relu"}  # fmt: skip
# HF dense activation names -> ours (HF "gated-gelu" runs gelu_new, the tanh form, as our gated-gelu does)
_HF_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


# ------------------------------------------------------------------------------------------ key rules
def hf_rules(config: T5Config) -> list[KeyRule]:
    """How each of our t5-family parameters corresponds to HF T5 keys (several HF keys = row blocks)."""
    rules = [KeyRule("embeddings.word_embeddings.weight", ("shared.weight",))]
    gated = config.activation.startswith("gated-")
    stacks = [("encoder", config.num_layers), ("decoder", config.num_decoder_layers)]
    for stack, n in stacks:
        if n == 0:
            continue
        rules.append(
            KeyRule(
                f"{stack}.relative_bias.relative_attention_bias.weight",
                (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
            )
        )
        for i in range(n):
            o, t = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
            sa = f"{t}.0.SelfAttention"
            rules += [
                KeyRule(f"{o}.self_attn_norm.weight", (f"{t}.0.layer_norm.weight",)),
                KeyRule(f"{o}.self_attention.qkv.weight", tuple(f"{sa}.{p}.weight" for p in "qkv")),
                KeyRule(f"{o}.self_attention.o.weight", (f"{sa}.o.weight",)),
            ]
            ff = 1
            if stack == "decoder":
                ca, ff = f"{t}.1.EncDecAttention", 2
                rules += [
                    KeyRule(f"{o}.cross_attn_norm.weight", (f"{t}.1.layer_norm.weight",)),
                    KeyRule(f"{o}.cross_attention.q.weight", (f"{ca}.q.weight",)),
                    KeyRule(f"{o}.cross_attention.kv.weight", (f"{ca}.k.weight", f"{ca}.v.weight")),
                    KeyRule(f"{o}.cross_attention.o.weight", (f"{ca}.o.weight",)),
                ]
            mlp = f"{t}.{ff}.DenseReluDense"
            wis = ("wi_0", "wi_1") if gated else ("wi",)
            rules += [KeyRule(f"{o}.mlp.{w}.weight", (f"{mlp}.{w}.weight",)) for w in wis]
            rules += [
                KeyRule(f"{o}.mlp.wo.weight", (f"{mlp}.wo.weight",)),
                KeyRule(f"{o}.mlp_norm.weight", (f"{t}.{ff}.layer_norm.weight",)),
            ]
        rules.append(KeyRule(f"{stack}.final_layer_norm.weight", (f"{stack}.final_layer_norm.weight",)))
    if config.num_decoder_layers and not config.tie_word_embeddings:
        rules.append(KeyRule("lm_head.weight", ("lm_head.weight",)))
    return rules


# --------------------------------------------------------------------------------------------- config
def _activation(d: dict[str, Any], source: str) -> str:
    proj = d.get("feed_forward_proj")
    if proj is None:  # some configs only carry the derived fields
        act = d.get("dense_act_fn", "relu")
        proj = f"gated-{act}" if d.get("is_gated_act") else act
    gated = proj.startswith("gated-")
    act = _HF_ACT.get(proj.removeprefix("gated-"))
    if act is None or (gated and act not in ("relu", "gelu", "gelu_tanh")):
        raise CheckpointError(f"{source}: feed_forward_proj {proj!r} is not supported")
    if gated:
        return "gated-relu" if act == "relu" else "gated-gelu"
    return act


def scales_decoder_output(d: dict[str, Any]) -> bool:
    """Whether the LM head sees the decoder output scaled by d_model**-0.5 (our ``tie_word_embeddings``).

    transformers 4 derives it from ``tie_word_embeddings`` (absent = True); transformers 5 always ties the
    input tables, forces ``tie_word_embeddings`` to True and records the scaling as
    ``scale_decoder_outputs``, which therefore wins when present."""
    if "scale_decoder_outputs" in d:
        return bool(d["scale_decoder_outputs"])
    return bool(d.get("tie_word_embeddings", True))


def config_from_hf(d: dict[str, Any], *, has_decoder: bool, source: str = "config.json") -> T5Config:
    """A t5-family T5Config from an HF T5 ``config.json`` (as a dict)."""
    if d.get("model_type", "t5") != "t5":
        raise CheckpointError(f"{source}: model_type {d.get('model_type')!r} is not supported (t5 only)")
    try:
        num_layers = int(d["num_layers"])
        dropout = float(d.get("dropout_rate", 0.1))
        return T5Config(
            family="t5",
            vocab_size=int(d["vocab_size"]), d_model=int(d["d_model"]), d_ff=int(d["d_ff"]),
            num_heads=int(d["num_heads"]), d_kv=int(d["d_kv"]), num_layers=num_layers,
            num_decoder_layers=int(d.get("num_decoder_layers") or num_layers) if has_decoder else 0,
            activation=_activation(d, source),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
            dropout_rate=dropout, attention_dropout_rate=dropout,
            initializer_std=float(d.get("initializer_factor", 1.0)),
            max_position_embeddings=0,
            relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
            tie_word_embeddings=scales_decoder_output(d),
            seq_length=int(d.get("n_positions") or 512),
        )  # fmt: skip
    except KeyError as exc:
        raise CheckpointError(f"{source}: missing setting {exc.args[0]!r}") from None
    except (TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{source}: invalid T5 configuration: {exc}") from None


def config_to_hf(config: T5Config, tokenizer: ProteinTokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` transformers needs to rebuild `config` (T5ForConditionalGeneration, or
    T5EncoderModel when there is no decoder)."""
    full = config.num_decoder_layers > 0
    d: dict[str, Any] = {
        "architectures": ["T5ForConditionalGeneration" if full else "T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_ff": config.d_ff,
        "d_kv": config.d_kv,
        "num_heads": config.num_heads,
        "num_layers": config.num_layers,
        "feed_forward_proj": ACT_TO_HF[config.activation],
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "dropout_rate": config.dropout_rate,
        "initializer_factor": config.initializer_std,
        "n_positions": config.seq_length,
        "is_encoder_decoder": full,
        "use_cache": full,
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_decoder_outputs": config.tie_word_embeddings,  # transformers 5's name for the same switch
        "pad_token_id": tokenizer.pad_id,
        "eos_token_id": tokenizer.eos_id,
        "decoder_start_token_id": tokenizer.decoder_start_id,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),  # transformers 4.x name
    }
    if full:
        d["num_decoder_layers"] = config.num_decoder_layers
    return d


# ------------------------------------------------------------------------------------------- weights
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _load_bin(path: Path) -> dict[str, Tensor]:
    """A ``pytorch_model.bin`` as plain tensors (``weights_only``: no code runs), memory-mapped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - an unpickling failure: refuse rather than run code
        raise CheckpointError(f"{path}: cannot read as plain tensors (weights_only=True): {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def read_hf_state(path: Path, dtype: torch.dtype | None = None) -> LazyTensors:
    """All weights of an HF directory -- a single safetensors/bin file or the shards an index names -- as a
    :class:`~._common.LazyTensors` (safetensors tensors read when looked up; floating ones converted to
    `dtype`)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        files = [path / name] if (path / name).is_file() else None
        index = path / f"{name}.index.json"
        if files is None and index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            files = []
            for shard in sorted(set(weight_map.values())):
                shard_path = path / shard
                if not shard_path.is_file() or shard_path.parent != path:
                    raise CheckpointError(f"{index}: shard {shard!r} is missing")
                files.append(shard_path)
        if files is None:
            continue
        if name.endswith(".safetensors"):
            return LazyTensors(files, dtype)
        state: dict[str, Tensor] = {}
        for file in files:
            state.update(_load_bin(file))
        return LazyTensors((), dtype, extra=state)
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin (or sharded index) found")


def _check_aliases(state: LazyTensors, config: T5Config, source: str) -> dict[str, Any]:
    """HF's aliases of the word table must hold the same values; returns notes for ``config.extra``."""
    notes: dict[str, Any] = {}
    shared = state.get("shared.weight")
    for key in _ALIASES:
        if key in state and shared is not None and not torch.equal(state[key], shared):
            raise CheckpointError(f"{source}: {key} differs from shared.weight (untied input embeddings)")
    if config.tie_word_embeddings and "lm_head.weight" in state and shared is not None:
        if not torch.equal(state["lm_head.weight"], shared):
            log.warning(
                "%s: the config scales the decoder output for a head tied to the word table, so the stored "
                "lm_head.weight, which differs from that table, is ignored, as transformers 4 does "
                "(transformers 5 would use the stored matrix with the scaling). Encoder outputs are "
                "unaffected.",
                source,
            )
            notes["ignored_lm_head_weight"] = True
    return notes


def _check_tokenizer_files(path: Path, tokenizer: ProteinTokenizer) -> None:
    spiece = path / "spiece.model"
    if tokenizer.layout != "rostlab" or not spiece.is_file():
        return
    pieces = [p.removeprefix("\u2581") for p in read_pieces(spiece.read_bytes(), str(spiece))]
    if pieces[: len(ROSTLAB_PIECES)] != list(ROSTLAB_PIECES):
        raise CheckpointError(
            f"{spiece}: not the Rostlab ProtT5 vocabulary (first pieces {pieces[:6]}...; expected "
            f"{list(ROSTLAB_PIECES[:6])}...)"
        )


# ---------------------------------------------------------------------------------------------- load
def load_hf(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[T5Model, ProteinTokenizer]:
    """Model and tokenizer from an HF T5 directory (full or encoder-only; fp32, fp16 or bf16 weights). The
    weights are read one tensor at a time straight into `dtype` (None: float32), so loading holds no
    float32 copy of a model wanted in half precision (the t5 family has no LayerNorm kept in float32)."""
    path = Path(path)
    cfg_path = path / "config.json"
    d = _read_json(cfg_path)
    state = read_hf_state(path, dtype or torch.float32)
    has_decoder = any(k.startswith("decoder.block.") for k in state)
    config = config_from_hf(d, has_decoder=has_decoder, source=str(cfg_path))

    tok_path = path / TOKENIZER_NAME
    if tok_path.is_file():
        try:
            tokenizer = ProteinTokenizer.from_dict(_read_json(tok_path))
        except (ConfigError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{tok_path}: invalid tokenizer description: {exc}") from None
    else:
        tokenizer = ProteinTokenizer.for_layout("rostlab")
    _check_tokenizer_files(path, tokenizer)
    if config.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(
            f"{cfg_path}: vocab_size {config.vocab_size} is smaller than the {tokenizer.layout} tokenizer's "
            f"{tokenizer.vocab_size} ids"
        )

    source = str(path)
    notes = _check_aliases(state, config, source)
    config.extra = {"hf": {"source": source, "architectures": d.get("architectures"), **notes}}
    ignored = set(_ALIASES) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if not has_decoder:  # encoder-only: a stray lm_head is meaningless
        ignored.add("lm_head.weight")
    if has_decoder and not config.tie_word_embeddings and "lm_head.weight" not in state and "shared.weight" in state:
        state = state.with_extra({"lm_head.weight": state["shared.weight"]})  # unscaled head on the shared table
    ours = apply_rules(state, hf_rules(config), source=source, ignore=ignored.__contains__)
    model = empty_model(config)
    load_state_dict_strict(model, ours, source=source, dtype=dtype or torch.float32)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- save
def save_hf(
    model: T5Model, tokenizer: ProteinTokenizer, path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write a t5-family model as an HF T5 directory (``config.json`` + ``model.safetensors``) that
    transformers' ``T5ForConditionalGeneration`` (``T5EncoderModel`` without decoder) loads with the same
    outputs. Written atomically. `dtype` converts the weights (e.g. torch.float16)."""
    config = model.config
    if config.family != "t5":
        raise CheckpointError(
            f"cannot export a {config.family}-family model to HF T5: it uses learned absolute positions, "
            "LayerNorm with bias, linear biases and scaled attention, which HF's T5 does not have; "
            "save it in the native format instead (prott5nv convert SRC DST --to native)"
        )
    if config.activation not in ACT_TO_HF:
        raise CheckpointError(f"activation {config.activation!r} has no HF T5 equivalent")
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    for rule in hf_rules(config):
        w = state[rule.ours].detach().cpu()
        if dtype is not None and w.is_floating_point():
            w = w.to(dtype)
        for key, part in zip(rule.theirs, w.chunk(len(rule.theirs), dim=0), strict=True):
            out[key] = part.contiguous()
    weight_dtype = dtype or state["embeddings.word_embeddings.weight"].dtype
    with atomic_directory(path, owns=CHECKPOINT_FILES) as tmp:
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_cfg = config_to_hf(config, tokenizer, weight_dtype)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        (tmp / TOKENIZER_NAME).write_text(json.dumps(tokenizer.to_dict(), indent=1) + "\n")
    return Path(path)
