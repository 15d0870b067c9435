"""Training heads: on frozen features (the fast path) or together with the encoder (fine-tuning).

Both paths share one loop (:func:`_fit`): mini-batches, a task loss (cross-entropy with optional
balanced class weights and masked residues ignored; MSE on standardized targets), evaluation on the val
split after each epoch, early stopping on its score (accuracy / Spearman) with the best weights restored.
Fine-tuning reuses the pretraining recipe's AdamW groups and inverse-sqrt schedule
(:mod:`prott5nv.train.optim`) over token-budget batches of similar-length proteins.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..inference.length import LengthPolicy, resolve
from .heads import Head
from .metrics import score, task_metrics
from .options import FitOptions
from .tasks import SPLITS, Task, TaskData

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    head: Head
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> metrics
    best_epoch: int = 0
    encoder: nn.Module | None = None  # the fine-tuned T5Model (with LoRA: the base encoder with adapters)
    trainable: int = 0  # parameters trained (head, and encoder or adapters)


# ------------------------------------------------------------------------------------------ batches
def _label_batch(task: Task, labels: Sequence[Any], lengths: Sequence[int]) -> Tensor:
    if not task.per_residue:
        if task.classification:
            return torch.tensor([int(v) for v in labels], dtype=torch.long)
        return torch.from_numpy(np.stack([np.asarray(v, np.float32).reshape(-1) for v in labels]))
    longest = max(lengths)
    if task.classification:
        out = torch.full((len(labels), longest), -1, dtype=torch.long)
    else:
        out = torch.full((len(labels), longest, 1), float("nan"))
    for i, (v, n) in enumerate(zip(labels, lengths, strict=True)):
        out[i, :n] = torch.from_numpy(np.asarray(v)[:n]).view(out[i, :n].shape)
    return out


class FrozenRows:
    """Precomputed features of some rows: ``[N, D]`` per protein or a list of ``(L, D)`` per residue."""

    def __init__(self, task: Task, features: np.ndarray | list[np.ndarray], labels: Sequence[Any] | None) -> None:
        self.task, self.features, self.labels = task, features, labels

    def __len__(self) -> int:
        return len(self.features)

    def batches(self, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[tuple]:
        """``(inputs, labels or None, lengths, row indices)``; shuffled when `rng` is given."""
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for a in range(0, len(order), batch_size):
            idx = order[a : a + batch_size].tolist()
            if self.task.per_residue:
                lengths = [len(self.features[i]) for i in idx]
                x = torch.zeros(len(idx), max(lengths), self.features[idx[0]].shape[1])
                for j, i in enumerate(idx):
                    x[j, : lengths[j]] = torch.from_numpy(np.asarray(self.features[i], np.float32))
                mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
                inputs: tuple = (x, mask)
            else:
                lengths = [1] * len(idx)
                inputs = (torch.from_numpy(np.asarray(self.features[idx], np.float32)),)
            y = _label_batch(self.task, [self.labels[i] for i in idx], lengths) if self.labels is not None else None
            yield inputs, y, lengths, idx


class TokenRows:
    """Tokenized rows for fine-tuning / fine-tuned prediction, batched under a token budget."""

    def __init__(self, task: Task, model: Any, seqs: Sequence[str], labels: Sequence[Any] | None,
                 length: LengthPolicy, batch_tokens: int) -> None:  # fmt: skip
        self.task, self.model, self.labels, self.batch_tokens = task, model, labels, batch_tokens
        length.check([f"sequence {i + 1}" for i in range(len(seqs))], [len(s) for s in seqs])
        cut = [length.cut(s) for s in seqs]
        self.tokens = model.encode(cut)
        self.residues = [len(s) for s in cut]

    def __len__(self) -> int:
        return len(self.tokens)

    def batches(self, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[tuple]:
        """Length-sorted batches within the token budget; with `rng`, the pretraining sampler's shuffled
        buckets of similar lengths in random order."""
        from ..data.batching import TokenBudgetBatchSampler, token_budget_batches

        lengths = [len(t) for t in self.tokens]
        if rng is None:
            groups = token_budget_batches(lengths, self.batch_tokens, batch_size)
        else:
            sampler = TokenBudgetBatchSampler(lengths, self.batch_tokens, batch_size, seed=int(rng.integers(2**31)),
                                              bucket_size=max(16 * batch_size, 256))  # fmt: skip
            groups = sampler.epoch_batches()
        for idx in groups:
            res = [self.residues[i] for i in idx]
            y = _label_batch(self.task, [self.labels[i] for i in idx], res) if self.labels is not None else None
            yield self.model.collate([self.tokens[i] for i in idx]), y, res, idx


class EncoderHead(nn.Module):
    """The encoder and a head trained together: ``(input_ids, attention_mask) -> head outputs``; the head
    reads encoder layer `layer` (an index 0..num_layers; None: the encoder's output)."""

    def __init__(self, encoder: nn.Module, head: Head, num_special_suffix: int, layer: int | None = None) -> None:
        super().__init__()
        self.encoder, self.head, self.suffix, self.layer = encoder, head, num_special_suffix, layer

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        from ..api import ProtT5nv

        if self.layer is None:
            hiddens = self.encoder.encode(input_ids, attention_mask).float()
        else:
            hiddens = self.encoder.encode_layers(input_ids, attention_mask, [self.layer])[0].float()
        lengths = attention_mask.sum(1) - self.suffix
        width = hiddens.shape[1] - self.suffix
        mask = torch.arange(width, device=hiddens.device)[None] < lengths[:, None]
        hiddens = hiddens[:, :width]
        if self.head.per_residue:
            return self.head(hiddens, mask)
        return self.head(ProtT5nv.hiddens_to_embedding(hiddens, mask))


# ---------------------------------------------------------------------------------------- the loop
def task_loss(task: Task, head: Head, out: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy (masked residues ignored) or MSE on standardized finite targets."""
    y = y.to(out.device)
    if task.classification:
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1), weight=weight, ignore_index=-1)
    target = ((y - head.y_shift) / head.y_scale).reshape(out.shape)
    ok = ~torch.isnan(target)
    return F.mse_loss(out.float()[ok], target[ok])


def decode_outputs(task: Task, head: Head, out: Tensor, lengths: Sequence[int]) -> tuple[list[Any], list[Any]]:
    """Encoded predictions (class indices / values) and class probabilities (None for regression)."""
    out = out.detach().float()
    if not task.classification:
        values = head.values(out).cpu().numpy()
        if task.per_residue:
            return [values[i, :n, 0] for i, n in enumerate(lengths)], [None] * len(lengths)
        return list(values), [None] * len(lengths)
    probs = out.cpu().softmax(-1)
    pred = probs.argmax(-1)
    if task.per_residue:
        return ([pred[i, :n].numpy() for i, n in enumerate(lengths)],
                [probs[i, :n].numpy() for i, n in enumerate(lengths)])  # fmt: skip
    return pred.tolist(), list(probs.numpy())


@torch.no_grad()
def run_net(
    net: nn.Module, head: Head, task: Task, rows: FrozenRows | TokenRows, batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[list, list, float]:  # fmt: skip
    """Predictions and probabilities for every row (row order) and the mean loss when labelled."""
    was_training = net.training
    net.eval()
    preds: list[Any] = [None] * len(rows)
    probs: list[Any] = [None] * len(rows)
    loss_sum, batches = 0.0, 0
    for inputs, y, lengths, idx in rows.batches(batch_size):
        with autocast() if autocast else contextlib.nullcontext():
            out = net(*inputs)
        if y is not None:
            loss_sum += float(task_loss(task, head, out, y))
            batches += 1
        p, q = decode_outputs(task, head, out, lengths)
        for j, i in enumerate(idx):
            preds[i], probs[i] = p[j], q[j]
    net.train(was_training)
    return preds, probs, loss_sum / max(batches, 1)


def class_weights(task: Task, labels: Sequence[Any]) -> Tensor:
    """Balanced weights ``n / (K * count_k)`` from training labels (masked residues not counted)."""
    flat = np.concatenate([np.atleast_1d(np.asarray(v, np.int64)) for v in labels])
    counts = np.bincount(flat[flat >= 0], minlength=task.out_dim).astype(np.float64)
    return torch.tensor(counts.sum() / (task.out_dim * np.maximum(counts, 1.0)), dtype=torch.float32)


def _fit(
    net: nn.Module,
    head: Head,
    task: Task,
    train: FrozenRows | TokenRows,
    val: FrozenRows | TokenRows,
    val_labels: Sequence[Any],
    opts: FitOptions,
    optimizer: torch.optim.Optimizer,
    *,
    weight: Tensor | None = None,
    on_step: Callable[[int], float | None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[list[dict[str, float]], int]:
    """Epochs until `max_epochs`, `max_steps` or `patience` epochs without a better val score (or the same
    score at a lower val loss); the best
    epoch's weights are restored. `on_step(step)` may set the learning rate before each step."""
    rng = np.random.default_rng(opts.seed)
    best, best_epoch, best_state = (-math.inf, -math.inf), 0, _trained_state(net)
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, opts.max_epochs + 1):
        net.train()
        total, count = 0.0, 0
        for inputs, y, _lengths, _idx in train.batches(opts.batch_size, rng):
            if on_step is not None:
                on_step(step)
            with autocast() if autocast else contextlib.nullcontext():
                out = net(*inputs)
            loss = task_loss(task, head, out, y, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opts.trains_encoder:
                torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            total, count, step = total + float(loss.detach()), count + 1, step + 1
            if opts.max_steps is not None and step >= opts.max_steps:
                break
        preds, _, val_loss = run_net(net, head, task, val, opts.batch_size, autocast)
        val_score = score(task, task_metrics(task, val_labels, preds))
        row = {"epoch": epoch, "step": step, "train_loss": total / max(count, 1), "val_loss": val_loss,
               "val_score": val_score}  # fmt: skip
        history.append(row)
        log.debug("epoch %d: %s", epoch, row)
        if on_epoch is not None:
            on_epoch(row)
        if (val_score, -val_loss) > best:  # a better score, or the same score at a lower loss
            best, best_epoch, best_state = (val_score, -val_loss), epoch, _trained_state(net)
        elif epoch - best_epoch >= opts.patience:
            break
        if opts.max_steps is not None and step >= opts.max_steps:
            break
    net.load_state_dict(best_state, strict=False)
    net.eval()
    return history, best_epoch


def _trained_state(net: nn.Module) -> dict[str, Tensor]:
    """A copy of the parameters training changes (frozen weights are not copied: with LoRA, only the
    adapters and the head)."""
    return {k: p.detach().clone() for k, p in net.named_parameters() if p.requires_grad}


def _split_rows(data: TaskData) -> dict[str, list[int]]:
    return {s: [i for i, x in enumerate(data.splits) if x == s] for s in SPLITS}


def _evaluate(net: nn.Module, head: Head, data: TaskData, rows: dict[str, FrozenRows | TokenRows],
              batch_size: int, autocast=None, splits: Sequence[str] = SPLITS) -> dict[str, dict[str, Any]]:  # fmt: skip
    out = {}
    for split, r in rows.items():
        if len(r) and split in splits:
            preds, _, _ = run_net(net, head, data.task, r, batch_size, autocast)
            out[split] = task_metrics(data.task, r.labels, preds)
    return out


def fit_frozen(
    data: TaskData,
    featurizer: Any,
    opts: FitOptions,
    *,
    progress: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Featurize every row once (cached for embeddings), then train a head on the train split."""
    task = data.task
    torch.manual_seed(opts.seed)
    index = _split_rows(data)
    feats = (featurizer.per_residue if task.per_residue else featurizer.per_protein)(data.sequences, progress)
    rows = {s: FrozenRows(task, [feats[i] for i in idx] if task.per_residue else feats[idx],
                          [data.labels[i] for i in idx]) for s, idx in index.items()}  # fmt: skip
    head = Head(opts.head, featurizer.dim, task.out_dim, per_residue=task.per_residue, hidden=opts.hidden_size(),
                dropout=opts.dropout)  # fmt: skip
    train = rows["train"]
    head.fit_normalization(train.features, None if task.classification else _regression_targets(task, train.labels))
    weight = class_weights(task, train.labels) if opts.class_weights and task.classification else None
    optimizer = torch.optim.AdamW(head.parameters(), lr=opts.learning_rate, weight_decay=opts.weight_decay)
    history, best = _fit(head, head, task, train, rows["val"], rows["val"].labels, opts, optimizer,
                         weight=weight, on_epoch=on_epoch)  # fmt: skip
    trainable = sum(p.numel() for p in head.parameters())
    return FitResult(head, history, _evaluate(head, head, data, rows, opts.batch_size), best, trainable=trainable)


def _regression_targets(task: Task, labels: Sequence[Any]) -> Tensor:
    return torch.from_numpy(np.concatenate([np.asarray(v, np.float32).reshape(-1, task.out_dim) for v in labels]))


def encoder_only(model: nn.Module) -> nn.Module:
    """A copy of a T5Model without its decoder (what fine-tuning trains and a fine-tuned predictor keeps)."""
    from ..model.t5 import T5Model

    out = T5Model(model.config.replace(num_decoder_layers=0))
    state = {k: v for k, v in model.state_dict().items() if k in out.state_dict()}
    out.load_state_dict(state)
    return out.eval()


def set_trainable(encoder: nn.Module, unfreeze_layers: int | None, layer: int | None = None) -> int:
    """Freeze the decoder (unused) and, with `unfreeze_layers` = N, all but the top N encoder blocks below
    the head's `layer` (default: the output) and the final norm (when the head reads the output). Blocks
    above `layer` do not take part. Returns the number of trainable encoder parameters."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    stack = encoder.encoder
    top = len(stack.blocks) if layer is None else layer
    norm = [stack.final_layer_norm] if top == len(stack.blocks) else []
    if unfreeze_layers is None:
        trainable: list[nn.Module] = [encoder.embeddings, *stack.blocks[:top], *norm]
        trainable += [stack.relative_bias] if stack.relative_bias is not None else []
    else:
        n = min(unfreeze_layers, top)
        trainable = list(stack.blocks[top - n : top]) + (norm if n else [])
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def fit_finetune(
    data: TaskData,
    model: Any,
    opts: FitOptions,
    *,
    max_length: int | None = None,
    length: LengthPolicy | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    layer: int | None = None,
) -> FitResult:
    """Train a copy of the encoder of `model` (a :class:`~prott5nv.api.ProtT5nv`) with a head reading
    encoder layer `layer` (an index 0..num_layers; None: the output); the result's `encoder` is the tuned
    copy (with `opts.lora`: the frozen encoder with trained LoRA adapters, see
    :mod:`prott5nv.downstream.lora`). Long proteins follow `length` (default: cut to `max_length`, or to
    the model's limit); the encoder is trained on whole proteins, so chunking is refused."""
    from ..model.fast import apply_speedups
    from ..train.optim import inverse_sqrt_lr, param_groups

    task = data.task
    torch.manual_seed(opts.seed)
    length = length or resolve(model, max_length, "truncate")
    if length.window is not None:
        raise ConfigError("fine-tuning trains the encoder on whole proteins: use --truncate, not --chunk")
    index = _split_rows(data)
    rows = {s: TokenRows(task, model, [data.sequences[i] for i in idx], [data.labels[i] for i in idx], length,
                         opts.batch_tokens) for s, idx in index.items()}  # fmt: skip
    head = Head(opts.head, model.embedding_dim, task.out_dim, per_residue=task.per_residue,
                hidden=opts.hidden_size(), dropout=opts.dropout).to(model.device)  # fmt: skip
    if not task.classification:  # features stay as the encoder's final LayerNorm gives them
        head.fit_normalization(None, _regression_targets(task, rows["train"].labels).to(model.device))
    encoder = apply_speedups(encoder_only(model.model))  # a copy: the caller's model stays as it was
    if opts.lora:
        from .lora import add_adapters, trainable_parameters

        add_adapters(encoder, opts.lora_spec())
        trainable = trainable_parameters(encoder)
        log.info("LoRA: %s adapter parameters (rank %d on %s) and the head; %s encoder weights frozen",
                 f"{trainable:,}", opts.lora_rank, ", ".join(opts.lora_modules()),
                 f"{sum(p.numel() for p in encoder.parameters()) - trainable:,}")  # fmt: skip
    else:
        trainable = set_trainable(encoder, opts.unfreeze_layers, layer)
        log.info("fine-tuning %s encoder parameters and the head", f"{trainable:,}")
    net = EncoderHead(encoder, head, model.tokenizer.num_special_suffix, layer).to(model.device)
    lr = opts.learning_rate
    groups = [dict(g, lr_scale=1.0) for g in param_groups(encoder, opts.weight_decay)]
    groups += [dict(g, lr_scale=opts.head_lr_scale) for g in param_groups(head, opts.weight_decay)]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    total = opts.max_steps or opts.max_epochs * 10**9  # the schedule decays without an end unless max_steps

    def on_step(step: int) -> None:
        rate = inverse_sqrt_lr(step, lr, opts.warmup_steps, total) if opts.warmup_steps else lr
        for g in optimizer.param_groups:
            g["lr"] = rate * g["lr_scale"]

    weight = None
    if opts.class_weights and task.classification:
        weight = class_weights(task, rows["train"].labels).to(model.device)
    autocast = None
    if model.dtype != torch.float32:
        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(model.device.type, dtype=model.dtype)
    history, best = _fit(net, head, task, rows["train"], rows["val"], rows["val"].labels, opts, optimizer,
                         weight=weight, on_step=on_step, on_epoch=on_epoch, autocast=autocast)  # fmt: skip
    for p in net.parameters():
        p.requires_grad_(False)
    metrics = _evaluate(net, head, data, rows, opts.batch_size, autocast, ("val", "test"))  # no costly train pass
    trainable += sum(p.numel() for p in head.parameters())
    return FitResult(head, history, metrics, best, encoder=encoder, trainable=trainable)
