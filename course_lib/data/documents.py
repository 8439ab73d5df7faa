"""Many documents of different lengths: padding, packing and dynamic batching.

Three ways to turn documents into (B, T) batches:

- **padding** (:class:`LLMDataset` + :func:`collate_padded`): one document per row, short rows
  filled with ``pad_id``; the labels there are ``-100`` (not scored) and the attention mask
  comes from the real lengths.
- **packing** (:func:`pack_sequences`): documents joined by ``<eos>`` and cut into full rows;
  no padding at all.
- **dynamic batching** (:class:`DynamicBatchSampler`): padding, but rows of similar length
  share a batch and the batch size adapts to a token budget, so little is wasted.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from course_lib.constants import IGNORE_INDEX
from course_lib.data.tokenization import Tokenizer

Item = dict[str, torch.Tensor]


class LLMDataset(Dataset):
    """Documents tokenised once, as unpadded next-token examples.

    Each document becomes ``ids = encode(text) + [eos]`` truncated to ``max_length + 1`` ids,
    and the item ``{"input_ids": ids[:-1], "labels": ids[1:]}`` (at most ``max_length`` long).
    Documents too short to give one (input, label) pair (the empty string) are skipped and
    counted in ``num_skipped``. Batch items with :meth:`collate` (or :func:`collate_padded`).
    """

    def __init__(self, texts: Sequence[str], tokenizer: Tokenizer, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        encode_batch = getattr(tokenizer, "encode_batch", None)
        encoded = encode_batch(list(texts)) if encode_batch else [tokenizer.encode(t) for t in texts]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.items: list[Item] = []
        for ids in encoded:
            ids = (ids + [tokenizer.eos_id])[: max_length + 1]
            if len(ids) >= 2:
                t = torch.tensor(ids, dtype=torch.long)
                self.items.append({"input_ids": t[:-1], "labels": t[1:]})
        self.num_skipped = len(encoded) - len(self.items)
        if not self.items:
            raise ValueError(f"no usable documents among {len(encoded)} texts: pass non-empty strings")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        return self.items[index]

    @functools.cached_property
    def lengths(self) -> list[int]:
        """Real (unpadded) length of each item, for :class:`DynamicBatchSampler`."""
        return [item["input_ids"].numel() for item in self.items]

    def collate(self, items: Sequence[Item]) -> Item:
        """:func:`collate_padded` with this tokenizer's ``pad_id`` (a DataLoader ``collate_fn``)."""
        return collate_padded(items, self.tokenizer.pad_id)


def collate_padded(items: Sequence[Item], pad_id: int) -> Item:
    """Pad items (right padding) into tensors for the model.

    Returns ``input_ids`` padded with ``pad_id``, ``labels`` padded with ``-100`` (so the loss
    ignores padding) and ``attention_mask`` (1 on real tokens, 0 on padding) built from the
    real lengths: deriving it from ``input_ids != pad_id`` would also hide every real token
    equal to ``pad_id``, e.g. all the ``<eos>`` tokens when pad == eos.
    """
    if not items:
        raise ValueError("cannot collate an empty list of items")
    lengths = torch.tensor([item["input_ids"].numel() for item in items])
    width = int(lengths.max())
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = item["input_ids"].numel()
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_sequences(token_lists: Sequence[Sequence[int]], block_size: int, eos_id: int) -> Item:
    """Join documents into one stream (``doc + [eos]`` each) and cut it into full rows.

    Returns ``{"input_ids": (N, block_size), "labels": (N, block_size)}`` with
    ``labels[:, t]`` the stream token after ``input_ids[:, t]``; there is no padding, so every
    position is scored. Row ``i`` holds stream tokens ``i*T .. i*T+T-1`` (T = block_size):
    every stream token up to ``N*T`` is an input exactly once. The tail that cannot fill a
    row (at most ``block_size`` tokens) is dropped. Attention is not blocked at document
    boundaries: a row may see the end of the previous document before its ``<eos>``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    stream = torch.tensor([t for ids in token_lists for t in (*ids, eos_id)], dtype=torch.long)
    n_rows = (stream.numel() - 1) // block_size
    if n_rows == 0:
        raise ValueError(
            f"{stream.numel()} tokens (documents + <eos> separators) cannot fill one row of "
            f"block_size + 1 = {block_size + 1} tokens: use more documents or a smaller block_size"
        )
    used = n_rows * block_size
    return {
        "input_ids": stream[:used].view(n_rows, block_size),
        "labels": stream[1 : used + 1].view(n_rows, block_size),
    }


class DynamicBatchSampler(Sampler[list[int]]):
    """Batches of indices of similar length under a token budget (``DataLoader(batch_sampler=...)``).

    Indices are sorted by real length and cut greedily so that every batch satisfies
    ``len(batch) * max_length_in_batch <= max_tokens``: short samples travel in big batches,
    long ones in small batches, and rows in a batch need little padding. Ties in length are
    broken randomly and the batch order is shuffled, both from ``(seed, epoch)`` only; call
    :meth:`set_epoch` each epoch for a new (reproducible) order. The number of batches is the
    same every epoch.

    ``drop_last`` drops the batch of the longest samples when the samples ran out before the
    budget was reached (one more sample of its length would still have fitted).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        if self.lengths.numel() == 0:
            raise ValueError("lengths is empty: there is nothing to batch")
        if int(self.lengths.min()) < 1:
            raise ValueError("every length must be >= 1")
        longest = int(self.lengths.max())
        if longest > max_tokens:
            index = int(self.lengths.argmax())
            raise ValueError(
                f"sample {index} has {longest} tokens, more than max_tokens={max_tokens}: raise "
                f"max_tokens to at least {longest} or truncate the samples (LLMDataset max_length)"
            )
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._num_batches = len(self._batches(torch.Generator().manual_seed(seed)))

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose (deterministic) order ``__iter__`` yields."""
        self.epoch = epoch

    def _batches(self, generator: torch.Generator) -> list[list[int]]:
        if self.shuffle:  # random tie-breaking: a stable sort of a random permutation
            perm = torch.randperm(self.lengths.numel(), generator=generator)
            order = perm[torch.sort(self.lengths[perm], stable=True).indices]
        else:
            order = torch.sort(self.lengths, stable=True).indices
        batches: list[list[int]] = []
        current: list[int] = []
        for index, length in zip(order.tolist(), self.lengths[order].tolist(), strict=True):
            if current and (len(current) + 1) * length > self.max_tokens:  # sorted: length is the max
                batches.append(current)
                current = []
            current.append(index)
        last_length = int(self.lengths[current[-1]])
        if not (self.drop_last and (len(current) + 1) * last_length <= self.max_tokens):
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        batches = self._batches(generator)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return iter(batches)

    def __len__(self) -> int:
        return self._num_batches


def padding_waste(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Fraction of the padded (B, max length) slots of ``batches`` that hold padding.

    ``batches`` are lists of indices into ``lengths`` (the real lengths), e.g. the output of a
    batch sampler. 0.0 means no padding at all.
    """
    lengths_t = torch.as_tensor(list(lengths), dtype=torch.long)
    real = slots = 0
    for batch in batches:
        if len(batch) == 0:
            raise ValueError("padding_waste got an empty batch")
        batch_lengths = lengths_t[torch.tensor([int(i) for i in batch], dtype=torch.long)]
        real += int(batch_lengths.sum())
        slots += len(batch) * int(batch_lengths.max())
    if slots == 0:
        raise ValueError("padding_waste needs at least one batch")
    return 1.0 - real / slots
