"""The bundled corpora, turned into token tensors, and a train/validation split without leakage."""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from course_lib.data.tokenization import Tokenizer

CORPORA = ("python_docs", "shakespeare")


@functools.cache
def load_corpus(name: str) -> str:
    """Return the text of a bundled corpus; nothing is downloaded.

    Args:
        name: ``"shakespeare"`` (about 1.1 M characters of plays shipped with ``course_lib``, see
            ``course_lib/data/README.md``) or ``"python_docs"`` (the Python reference topics of
            ``pydoc_data.topics``, joined in sorted-key order with a blank line; the text differs
            a little between Python releases).

    Raises:
        ValueError: for any other name (the message lists the choices).
    """
    if name == "shakespeare":
        return resources.files("course_lib.data").joinpath("shakespeare.txt").read_text(encoding="utf-8")
    if name == "python_docs":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    raise ValueError(f"unknown corpus {name!r}; choose one of {list(CORPORA)}")


def encode_corpus(name: str, tokenizer: Tokenizer | None = None) -> tuple[torch.Tensor, Tokenizer]:
    """Tokenise a bundled corpus into a 1-D ``torch.long`` tensor.

    Without ``tokenizer``, a :class:`~course_lib.data.CharTokenizer` is built from the corpus.
    Returns ``(tokens, tokenizer)``.
    """
    from course_lib.data.tokenization import CharTokenizer

    text = load_corpus(name)
    tokenizer = CharTokenizer.from_text(text) if tokenizer is None else tokenizer
    return torch.tensor(tokenizer.encode(text), dtype=torch.long), tokenizer


def train_val_split(
    tokens: torch.Tensor, val_fraction: float = 0.1, block_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D token stream into a training head and a validation tail.

    The split is contiguous: no token (and so no window of text) is in both parts, which a
    random split of overlapping windows cannot promise. Each side must hold at least
    ``block_size + 1`` tokens (one input window and its shifted labels).

    Raises:
        ValueError: if ``val_fraction`` is not in (0, 1) or a side would be too short.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D (one long stream), got shape {tuple(tokens.shape)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = tokens.numel()
    n_val = round(n * val_fraction)
    need = block_size + 1
    if n_val < need or n - n_val < need:
        raise ValueError(
            f"splitting {n} tokens with val_fraction={val_fraction} gives {n - n_val} train and {n_val} "
            f"validation tokens, but each side needs at least block_size + 1 = {need}: use more text, "
            f"a smaller block_size or a different val_fraction"
        )
    return tokens[: n - n_val], tokens[n - n_val :]
