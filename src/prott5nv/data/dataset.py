"""The pretraining dataset: sequence store -> token ids -> samples of the pretraining objective."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..tokenizer import ProteinTokenizer
from .masking import Masker, T5Sample
from .store import SequenceStore


class T5PretrainingDataset(Dataset):
    """Item `i` is sequence `i` of the store, tokenized and masked with randomness fixed by
    (masker seed, epoch, i). Call :meth:`set_epoch` each epoch to draw new masks; with persistent
    DataLoader workers, recreate the loader instead (workers hold their own copy of the dataset).
    Pickles without open files (the store reopens its memory maps in each worker).
    """

    def __init__(self, store: SequenceStore, tokenizer: ProteinTokenizer, masker: Masker, epoch: int = 0):
        self.store, self.tok, self.masker, self.epoch = store, tokenizer, masker, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: int | tuple[int, int]) -> T5Sample:
        """`key` is a sequence index (masked for the current epoch) or an ``(epoch, index)`` pair, which
        lets a sampler that spans epochs drive the masking."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        ids = self.tok.encode_residues(self.store.sequence(index))
        return self.masker(ids, index, epoch)
