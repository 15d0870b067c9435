"""Read NeMo / BioNeMo ``.nemo`` archives of Megatron T5 (ProtT5nv) into the ``megatron`` family.

The archive is a tar file holding ``model_config.yaml``, ``model_weights.ckpt`` (a PyTorch state dict)
and the tokenizer files the config names with a ``nemo:`` prefix. Everything is read from the archive in
memory: nothing is extracted to disk, the YAML is parsed with ``safe_load`` and the weights with
``torch.load(weights_only=True)``, so no code from the archive runs.

Facts this module relies on (checked against NeMo sources, see docs/checkpoints.md and docs/vocabulary.md):

* Keys (TP = PP = 1, non-mcore): ``enc_dec_model.encoder_embedding.{word,position}_embeddings``, layers at
  ``enc_dec_model.enc_dec_model.{encoder,decoder}.model.layers.{i}``, ``...model.final_layernorm``,
  ``enc_dec_model.tokens_head.bias``; ``megatron_amp_O2`` checkpoints insert ``module.`` after
  ``enc_dec_model.``. ``decoder_embedding.*`` keys, when present, alias the encoder's embedding module.
* Fused projections are interleaved per head: ``query_key_value`` rows are ``[heads, 3, head_dim]``,
  cross-attention ``key_value`` rows ``[heads, 2, head_dim]``; only ``megatron_legacy: True`` stores
  ``[3, heads, head_dim]`` (``[2, heads, head_dim]``), which is our own ``[q; k; v]`` order.
* Layer norms of a pre-LN layer (``ParallelTransformerLayer_.forward``): ``input_layernorm`` feeds the
  self-attention; in an encoder layer ``post_attention_layernorm`` feeds the MLP; in a decoder layer
  ``post_attention_layernorm`` feeds the cross-attention (``inter_attention``) and
  ``post_inter_attention_layernorm`` feeds the MLP.
* GELU: with ``bias_activation_fusion`` (older configs: ``bias_gelu_fusion``; absent in the oldest ones,
  where NeMo turns fusion on when ``bias`` is on) or ``openai_gelu`` NeMo computes the tanh form, else
  exact erf-GELU.

Sentinel layout (docs/vocabulary.md): NeMo <= 1.12 gave ``<extra_id_0..N-1>`` the ids 32.. (distinct); NeMo >= 1.13
maps every sentinel of this character-level tokenizer onto ``<unk>`` (collapsed). The weights do not say
which, so :func:`decide_sentinels` applies this rule, first match wins:

1. an explicit ``sentinels=`` argument (the user knows better);
2. ``tokenizer.num_sentinel_tokens`` is 0 (NeMo's default): no sentinels, "distinct" is moot;
3. the word-embedding row count: when ``make_vocab_size_divisible_by`` makes the two layouts differ in
   padded size, the rows say which one the model was built with;
4. the ``nemo_version`` NeMo records in the config when a model is first created: < 1.13 distinct,
   >= 1.13 collapsed;
5. otherwise distinct (prott5nv's own layout), with a warning.

The decision is logged and stored in ``config.extra["nemo"]["sentinels"]`` (with the reason).
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from ..model.config import T5Config
from ..model.t5 import T5Model
from ..tokenizer import PROTT5NV_PIECES, ProteinTokenizer, pad_to_multiple
from ._common import KeyRule, apply_rules, concat, load_state_dict_strict
from .sentencepiece import read_pieces

log = logging.getLogger(__name__)

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
NUM_BASE_TOKENS = len(PROTT5NV_PIECES) + 2  # the 30 pieces, <cls>, <sep>
FIRST_COLLAPSING_VERSION = (1, 13)


# ------------------------------------------------------------------------------------------ archive
class _Archive:
    """Members of a ``.nemo`` tar file by normalized name (``./`` prefixes dropped), read into memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:*")
            members = self._tar.getmembers()
        except (OSError, tarfile.TarError) as exc:
            raise CheckpointError(f"{path}: not a readable .nemo (tar) archive: {exc}") from None
        self.members = {self._norm(m.name): m for m in members if m.isfile()}

    @staticmethod
    def _norm(name: str) -> str:
        while name.startswith("./"):
            name = name[2:]
        return name.lstrip("/")

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tar.close()

    def find(self, name: str) -> str | None:
        """The member called `name`, or else the only member whose base name is `name`."""
        name = self._norm(name)
        if name in self.members:
            return name
        base = os.path.basename(name)
        hits = [m for m in self.members if os.path.basename(m) == base]
        return hits[0] if len(hits) == 1 else None

    def open(self, name: str):
        f = self._tar.extractfile(self.members[name])
        if f is None:
            raise CheckpointError(f"{self.path}: cannot read member {name}")
        return f

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()


# ------------------------------------------------------------------------------------------- config
def _part_configs(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Encoder and decoder settings. Old configs (ProtT5nv) keep one shared set at the top level; newer
    NeMo configs have ``encoder:`` / ``decoder:`` sections, with top-level keys as fallback."""
    enc = {**cfg, "arch": cfg.get("encoder_arch", "transformer")}
    dec = {**cfg, "arch": cfg.get("decoder_arch", "transformer")}
    if isinstance(cfg.get("encoder"), dict):
        enc = {**enc, **cfg["encoder"]}
    if isinstance(cfg.get("decoder"), dict):
        dec = {**dec, **cfg["decoder"]}
    return enc, dec


def _activation(part: dict[str, Any], where: str, fail) -> str:
    act = part.get("activation", "gelu")
    if act != "gelu":
        fail(f"{where} activation {act!r} is not supported (only NeMo's non-gated 'gelu')")
    if "bias_activation_fusion" in part:
        fused = bool(part["bias_activation_fusion"])
    elif "bias_gelu_fusion" in part:
        fused = bool(part["bias_gelu_fusion"])
    else:
        fused = bool(part.get("bias", True))  # the oldest configs: fusion was always on
    return "gelu_tanh" if fused or part.get("openai_gelu", False) else "gelu"


def _part_settings(part: dict[str, Any], where: str, fail) -> dict[str, Any]:
    """What one stack's NeMo settings mean for us; refuses what the megatron family cannot represent."""
    checks = [
        ("arch", "transformer", "architecture"),
        ("transformer_block_type", "pre_ln", "block type (only pre-LN)"),
        ("position_embedding_type", "learned_absolute", "position embedding type (relative/rotary "
         "positions are not part of the megatron family)"),
        ("bias", True, "bias setting (linear layers without bias)"),
        ("headscale", False, "headscale"),
        ("multi_query_attention", False, "multi-query attention"),
        ("normalize_attention_scores", True, "unnormalized attention scores"),
        ("num_moe_experts", 1, "mixture of experts"),
    ]  # fmt: skip
    for key, default, what in checks:
        value = part.get(key, default)
        if value is None:
            value = default
        if value != default:
            fail(f"{where} {what}: {key}={value!r} is not supported")
    norm = part.get("normalization", "layernorm")
    if norm not in ("layernorm", "layernorm1p"):
        fail(f"{where} normalization {norm!r} is not supported (megatron family: LayerNorm with bias)")
    for key in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers"):
        if not isinstance(part.get(key), int) or part[key] <= 0:
            fail(f"{where} {key} missing or invalid ({part.get(key)!r})")
    heads = part["num_attention_heads"]
    kv = part.get("kv_channels")
    if kv is None:
        if part["hidden_size"] % heads:
            fail(f"{where} hidden_size {part['hidden_size']} is not divisible by {heads} heads")
        kv = part["hidden_size"] // heads
    return {
        "d_model": part["hidden_size"],
        "d_ff": part["ffn_hidden_size"],
        "num_heads": heads,
        "d_kv": int(kv),
        "activation": _activation(part, where, fail),
        "layer_norm_epsilon": float(part.get("layernorm_epsilon", 1e-5)),
        "normalization": norm,
        "megatron_legacy": bool(part.get("megatron_legacy", False)),
    }


def config_from_nemo(cfg: dict[str, Any], *, source: str = "model_config.yaml") -> tuple[T5Config, dict]:
    """A megatron-family T5Config from a NeMo ``model_config.yaml`` (as a dict), plus the layout facts
    the weight mapping needs. Raises CheckpointError for anything the model cannot represent."""

    def fail(msg: str):
        raise CheckpointError(f"{source}: {msg}; prott5nv cannot load this checkpoint faithfully")

    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if int(cfg.get(key) or 1) > 1:
            fail(f"{key}={cfg[key]} (model-parallel shards); merge it to TP=PP=1 with NeMo first")
    if cfg.get("mcore_t5", False):
        fail("mcore_t5=True (megatron-core key names)")
    if not cfg.get("share_token_embeddings", True):
        fail("share_token_embeddings=False (separate encoder/decoder embeddings)")
    if not cfg.get("share_decoder_tokens_head_embeddings", True):
        fail("share_decoder_tokens_head_embeddings=False (an LM head separate from the word embeddings)")
    enc_part, dec_part = _part_configs(cfg)
    enc = _part_settings(enc_part, "encoder", fail)
    dec = _part_settings(dec_part, "decoder", fail)
    differ = [k for k in enc if enc[k] != dec[k]]
    if differ:
        fail(f"encoder and decoder differ in {', '.join(differ)} (one setting for both stacks is supported)")

    positions = cfg.get("max_position_embeddings") or cfg.get("seq_length")
    if not isinstance(positions, int) or positions <= 0:
        fail("max_position_embeddings missing")
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    seq_length = int(cfg.get("seq_length") or data.get("seq_length") or positions)
    seq_length_dec = int(data.get("seq_length_dec") or cfg.get("seq_length_dec") or min(256, positions))
    try:
        config = T5Config(
            family="megatron",
            vocab_size=1,  # replaced by the embedding's row count once the weights are read
            d_model=enc["d_model"], d_ff=enc["d_ff"], num_heads=enc["num_heads"], d_kv=enc["d_kv"],
            num_layers=enc_part["num_layers"], num_decoder_layers=dec_part["num_layers"],
            activation=enc["activation"], layer_norm_epsilon=enc["layer_norm_epsilon"],
            dropout_rate=float(enc_part.get("hidden_dropout", 0.1)),
            attention_dropout_rate=float(enc_part.get("attention_dropout", 0.1)),
            initializer_std=float(enc_part.get("init_method_std", 0.02)),
            max_position_embeddings=positions, seq_length=min(seq_length, positions),
            seq_length_dec=min(seq_length_dec, positions),
        )  # fmt: skip
    except ConfigError as exc:
        fail(str(exc))
    layout = {
        "megatron_legacy": enc["megatron_legacy"],
        "layernorm1p": enc["normalization"] == "layernorm1p",
        "tokens_head_bias": bool(cfg.get("tokens_head_bias", True)),
    }
    return config, layout


# ----------------------------------------------------------------------------------------- tokenizer
def _tokenizer_member(cfg: dict[str, Any], archive: _Archive, source: str) -> str:
    tok = cfg.get("tokenizer") if isinstance(cfg.get("tokenizer"), dict) else {}
    library = tok.get("library", "sentencepiece")
    if library != "sentencepiece":
        raise CheckpointError(f"{source}: tokenizer library {library!r} is not supported (use sentencepiece)")
    for key in ("model", "vocab_file"):
        ref = tok.get(key)
        if isinstance(ref, str) and ref:
            name = archive.find(ref.removeprefix("nemo:"))
            if name is not None:
                return name
    refs = [tok.get(k) for k in ("model", "vocab_file") if tok.get(k)]
    raise CheckpointError(
        f"{archive.path}: the tokenizer file the config names ({', '.join(map(str, refs)) or 'none'}) "
        "is not in the archive"
    )


def check_pieces(pieces: list[str], source: str) -> None:
    """The SentencePiece vocabulary must be ProtT5nv's 30 pieces (docs/vocabulary.md) in that order."""
    expected = list(PROTT5NV_PIECES)
    if pieces == expected:
        return
    pairs = enumerate(zip(pieces, expected, strict=False))
    diffs = [f"id {i}: {a!r} (expected {b!r})" for i, (a, b) in pairs if a != b]
    if len(pieces) != len(expected):
        diffs.insert(0, f"{len(pieces)} pieces (expected {len(expected)})")
    raise CheckpointError(f"{source}: not the ProtT5nv SentencePiece vocabulary: {'; '.join(diffs[:5])}")


def _version(value: Any) -> tuple[int, int] | None:
    m = re.match(r"\s*(\d+)\.(\d+)", str(value)) if value is not None else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def decide_sentinels(
    cfg: dict[str, Any], rows: int, num_sentinels: int, divisible_by: int, override: str | None = None
) -> tuple[str, str]:
    """``(layout, reason)``: "distinct" or "collapsed" sentinels, by the rule in the module docstring."""
    distinct_rows = pad_to_multiple(NUM_BASE_TOKENS + num_sentinels, divisible_by)
    collapsed_rows = pad_to_multiple(NUM_BASE_TOKENS, divisible_by)
    if override is not None:
        if override not in ("distinct", "collapsed"):
            raise ConfigError(f"unknown sentinel layout {override!r} (distinct or collapsed)")
        return override, "chosen by the caller"
    if num_sentinels == 0:
        return "distinct", "tokenizer.num_sentinel_tokens is 0 (no sentinels)"
    if rows == collapsed_rows != distinct_rows:
        return "collapsed", f"the embedding has {rows} rows, too few for {num_sentinels} distinct sentinels"
    if rows == distinct_rows != collapsed_rows:
        return "distinct", f"the embedding has {rows} rows = 32 + {num_sentinels} sentinels, padded"
    version = _version(cfg.get("nemo_version"))
    if version is not None:
        if version < FIRST_COLLAPSING_VERSION:
            return "distinct", f"created with NeMo {cfg['nemo_version']} (<= 1.12 gives ids 32..)"
        return "collapsed", f"created with NeMo {cfg['nemo_version']} (>= 1.13 maps sentinels to <unk>)"
    return "distinct", "undecidable (no nemo_version, embedding size fits both); assumed distinct"


# ------------------------------------------------------------------------------------------- weights
def _unfuse(n: int, heads: int, d_kv: int, legacy: bool):
    """Transform of a fused projection from Megatron's row order to ours (``[n, heads, d_kv]``)."""

    def transform(parts: list[Tensor]) -> Tensor:
        (w,) = parts
        if legacy:
            return w
        rest = w.shape[1:]
        return w.reshape(heads, n, d_kv, *rest).transpose(0, 1).reshape(n * heads * d_kv, *rest)

    return transform


def _plus_one(parts: list[Tensor]) -> Tensor:
    return parts[0] + 1  # layernorm1p stores gamma - 1


def megatron_rules(config: T5Config, layout: dict[str, Any]) -> list[KeyRule]:
    """How each of our megatron-family parameters is read from a NeMo Megatron T5 state dict."""
    e = "enc_dec_model."
    h, d = config.num_heads, config.d_kv
    rules = [
        KeyRule(f"embeddings.{table}.weight", (f"{e}encoder_embedding.{table}.weight",))
        for table in ("word_embeddings", "position_embeddings")
    ]
    if layout["tokens_head_bias"]:
        rules.append(KeyRule("lm_head_bias", (e + "tokens_head.bias",)))

    ln_weight = _plus_one if layout["layernorm1p"] else concat

    def norm(ours: str, theirs: str) -> list[KeyRule]:
        return [
            KeyRule(f"{ours}.weight", (f"{theirs}.weight",), ln_weight),
            KeyRule(f"{ours}.bias", (f"{theirs}.bias",)),
        ]

    def linear(ours: str, theirs: str, fused: int = 0) -> list[KeyRule]:
        t = _unfuse(fused, h, d, layout["megatron_legacy"]) if fused else concat
        return [KeyRule(f"{ours}.{p}", (f"{theirs}.{p}",), t) for p in ("weight", "bias")]

    stacks = [("encoder", config.num_layers), ("decoder", config.num_decoder_layers)]
    for stack, n in stacks:
        base = f"{e}enc_dec_model.{stack}.model"
        for i in range(n):
            o, t = f"{stack}.blocks.{i}", f"{base}.layers.{i}"
            rules += norm(f"{o}.self_attn_norm", f"{t}.input_layernorm")
            rules += linear(f"{o}.self_attention.qkv", f"{t}.self_attention.query_key_value", fused=3)
            rules += linear(f"{o}.self_attention.o", f"{t}.self_attention.dense")
            if stack == "decoder":
                rules += norm(f"{o}.cross_attn_norm", f"{t}.post_attention_layernorm")
                rules += linear(f"{o}.cross_attention.q", f"{t}.inter_attention.query")
                rules += linear(f"{o}.cross_attention.kv", f"{t}.inter_attention.key_value", fused=2)
                rules += linear(f"{o}.cross_attention.o", f"{t}.inter_attention.dense")
                rules += norm(f"{o}.mlp_norm", f"{t}.post_inter_attention_layernorm")
            else:
                rules += norm(f"{o}.mlp_norm", f"{t}.post_attention_layernorm")
            rules += linear(f"{o}.mlp.wi", f"{t}.mlp.dense_h_to_4h")
            rules += linear(f"{o}.mlp.wo", f"{t}.mlp.dense_4h_to_h")
        rules += norm(f"{stack}.final_layer_norm", f"{base}.final_layernorm")
    return rules


def _read_state(archive: _Archive) -> dict[str, Tensor]:
    shards = sorted(m for m in archive.members if re.search(r"(^|/)(mp_rank_|tp_rank_)", m))
    if shards:
        raise CheckpointError(
            f"{archive.path}: model-parallel shards ({', '.join(shards[:3])}); merge the checkpoint to "
            "tensor/pipeline parallel size 1 with NeMo first"
        )
    name = archive.find(WEIGHTS_NAME)
    if name is None:
        raise CheckpointError(f"{archive.path}: no {WEIGHTS_NAME} in the archive")
    try:
        with archive.open(name) as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not loadable safely"
        raise CheckpointError(
            f"{archive.path}: cannot read {name} as plain tensors (weights_only=True): {exc}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{archive.path}: {name} is not a state dict")
    return state


def _normalize_keys(state: dict[str, Any], source: str) -> dict[str, Tensor]:
    """Drop the ``module.`` of megatron_amp_O2 checkpoints and extra-state entries; check that the decoder
    embedding keys (an alias of the shared module) hold the encoder's tensors."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("_extra_state"):
            continue
        if key.startswith("enc_dec_model.module."):
            key = "enc_dec_model." + key[len("enc_dec_model.module.") :]
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: entry {key} is not a tensor")
        out[key] = value
    for key in [k for k in out if k.startswith("enc_dec_model.decoder_embedding.")]:
        twin = key.replace("decoder_embedding.", "encoder_embedding.", 1)
        if twin not in out or not torch.equal(out[twin], out[key]):
            raise CheckpointError(
                f"{source}: {key} differs from {twin}; the decoder has its own embeddings, which the "
                "megatron family (one shared embedding module) cannot represent"
            )
        del out[key]
    return out


# ---------------------------------------------------------------------------------------------- load
def load_nemo(path: str | os.PathLike, *, sentinels: str | None = None) -> tuple[T5Model, ProteinTokenizer]:
    """Model and tokenizer from a ``.nemo`` archive of a Megatron T5 (ProtT5nv). `sentinels` forces the
    sentinel layout ("distinct" or "collapsed") instead of :func:`decide_sentinels`' rule."""
    path = Path(path)
    with _Archive(path) as archive:
        cfg_name = archive.find(CONFIG_NAME)
        if cfg_name is None:
            raise CheckpointError(f"{path}: no {CONFIG_NAME} in the archive (not a .nemo checkpoint?)")
        source = f"{path}:{cfg_name}"
        try:
            cfg = yaml.safe_load(archive.read(cfg_name))
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{source}: invalid YAML: {exc}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{source}: not a model configuration")
        config, layout = config_from_nemo(cfg, source=source)

        tok_name = _tokenizer_member(cfg, archive, source)
        check_pieces(read_pieces(archive.read(tok_name), tok_name), f"{path}:{tok_name}")
        state = _normalize_keys(_read_state(archive), f"{path}:{WEIGHTS_NAME}")

    word_key = "enc_dec_model.encoder_embedding.word_embeddings.weight"
    if word_key not in state:
        raise CheckpointError(f"{path}: no {word_key} in {WEIGHTS_NAME} (not a Megatron T5 checkpoint?)")
    rows = state[word_key].shape[0]
    tok_cfg = cfg.get("tokenizer") if isinstance(cfg.get("tokenizer"), dict) else {}
    num_sentinels = int(tok_cfg.get("num_sentinel_tokens") or 0)
    divisible = int(cfg.get("make_vocab_size_divisible_by") or 128)
    layout_name, reason = decide_sentinels(cfg, rows, num_sentinels, divisible, sentinels)
    (log.warning if reason.startswith("undecidable") else log.info)(
        "%s: sentinel layout %s (%s)", path, layout_name, reason
    )
    tokenizer = ProteinTokenizer(
        layout="prott5nv", sentinels=layout_name, num_sentinels=num_sentinels,
        make_vocab_size_divisible_by=divisible,
    )  # fmt: skip
    if tokenizer.vocab_size != rows:
        raise CheckpointError(
            f"{path}: the word embedding has {rows} rows but the tokenizer ({num_sentinels} {layout_name} "
            f"sentinels, padded to a multiple of {divisible}) implies {tokenizer.vocab_size}"
        )
    config.vocab_size = rows
    config.extra = {
        "nemo": {
            "source": str(path),
            "nemo_version": str(cfg["nemo_version"]) if "nemo_version" in cfg else None,
            "sentinels": layout_name,
            "sentinel_reason": reason,
            "megatron_legacy": layout["megatron_legacy"],
            "normalization": "layernorm1p" if layout["layernorm1p"] else "layernorm",
            "activation": config.activation,
        }
    }
    ours = apply_rules(state, megatron_rules(config, layout), source=f"{path}:{WEIGHTS_NAME}")
    model = T5Model(config)
    if not layout["tokens_head_bias"]:
        ours["lm_head_bias"] = torch.zeros(rows)
    load_state_dict_strict(model, ours, source=f"{path}:{WEIGHTS_NAME}")
    return model, tokenizer
