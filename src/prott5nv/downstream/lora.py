"""LoRA adapters on the encoder, with peft (the optional ``lora`` extra: ``pip install 'prott5nv[lora]'``).

:func:`add_adapters` wraps the chosen projections of every encoder block (``spec["modules"]``, from
:meth:`~prott5nv.downstream.options.FitOptions.lora_spec`) in peft's ``lora.Linear``: the base weight stays
frozen and ``W x + (alpha / rank) B A x`` is computed, with A drawn at random and B zero, so the network
starts out computing what it did. Only the adapters are trainable. A predictor keeps just the adapter
tensors (:func:`adapter_state`, keys ``encoder.blocks.N.<module>.lora_A.weight``); they go back onto the
base model with :func:`load_adapters`, or into its weights with :func:`merge_adapters`.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError

ADAPTER = "default"  # peft's adapter name (one adapter per model)


def _peft() -> Any:
    try:
        import peft
        import peft.tuners.lora
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'prott5nv[lora]'") from None
    return peft


def target_pattern(modules: list[str]) -> str:
    """The regex (peft matches it against the whole module name) of the encoder's `modules` in every block;
    the decoder is never adapted."""
    return r"encoder\.blocks\.\d+\.(" + "|".join(re.escape(m) for m in modules) + ")"


def add_adapters(model: nn.Module, spec: dict[str, Any]) -> Any:
    """Put LoRA adapters (`spec`: rank, alpha, modules) on the encoder of a T5Model, in place, and freeze
    everything else. Returns peft's ``LoraModel`` (its ``.model`` is `model`; ``merge_and_unload()`` folds
    the adapters into the weights)."""
    peft = _peft()
    config = peft.LoraConfig(r=int(spec["rank"]), lora_alpha=float(spec["alpha"]), lora_dropout=0.0, bias="none",
                             target_modules=target_pattern(list(spec["modules"])))  # fmt: skip
    try:
        wrapped = peft.tuners.lora.LoraModel(model, config, ADAPTER)
    except ValueError as exc:  # no module matched
        raise ConfigError(f"LoRA targets {spec['modules']}: {exc}") from None
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return wrapped


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of a model given adapters by :func:`add_adapters` (CPU, contiguous)."""
    state = _peft().get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_adapters(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load adapter tensors saved by :func:`adapter_state` into a model with the same adapters; every
    tensor must be there with its shape (`where` names the file in the error)."""
    expected = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        shapes = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        raise CheckpointError(f"{where}: adapters do not fit the model (missing {missing[:3]}, unexpected "
                              f"{extra[:3]}, other shapes {shapes[:3]})")  # fmt: skip
    _peft().set_peft_model_state_dict(model, state, adapter_name=ADAPTER)


def merge_adapters(model: nn.Module, spec: dict[str, Any], state: dict[str, Tensor], where: str) -> nn.Module:
    """`model` (a T5Model, changed in place) with the adapters folded into its weights: plain modules and
    the native state-dict keys again, ``W + (alpha / rank) B A`` in each adapted projection."""
    wrapped = add_adapters(model, spec)
    load_adapters(model, state, where)
    merged = wrapped.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
