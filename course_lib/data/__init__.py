"""The data pipeline: bundled corpora, tokenisers, and batches for causal language modelling.

``labels[:, t]`` is always the target of position ``t`` (the shift happens here, not in the
model), and ``-100`` marks positions that are not scored.

- Corpora: :func:`load_corpus` (``"shakespeare"``, ``"python_docs"``), :func:`encode_corpus`,
  :func:`train_val_split` (contiguous: no leakage).
- Tokenisers: :class:`CharTokenizer`, :func:`train_bpe_tokenizer` (byte-level BPE).
- One long stream: :class:`RandomWindowBatches` (exactly resumable), :func:`eval_windows`.
- Many documents: :class:`LLMDataset` + :func:`collate_padded` (labels -100 on padding, mask
  from lengths), :func:`pack_sequences` (no padding), :class:`DynamicBatchSampler` (token
  budget), :func:`padding_waste`.
"""

from course_lib.data.corpus import CORPORA, encode_corpus, load_corpus, train_val_split
from course_lib.data.documents import (
    IGNORE_INDEX,
    DynamicBatchSampler,
    LLMDataset,
    collate_padded,
    pack_sequences,
    padding_waste,
)
from course_lib.data.tokenization import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
    train_bpe_tokenizer,
)
from course_lib.data.windows import RandomWindowBatches, eval_windows

__all__ = [
    "CORPORA",
    "IGNORE_INDEX",
    "BPETokenizer",
    "CharTokenizer",
    "DynamicBatchSampler",
    "LLMDataset",
    "RandomWindowBatches",
    "Tokenizer",
    "collate_padded",
    "encode_corpus",
    "eval_windows",
    "load_corpus",
    "load_tokenizer",
    "pack_sequences",
    "padding_waste",
    "tokenizer_from_dict",
    "train_bpe_tokenizer",
    "train_val_split",
]
