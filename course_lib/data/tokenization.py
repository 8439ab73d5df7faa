"""Two tokenisers with one interface: characters, and byte-level BPE trained locally.

Both reserve id 0 for ``<pad>`` and id 1 for ``<eos>``, encode text to a list of ids, decode
ids back to text (skipping the special tokens) and serialise to JSON-safe dicts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

PAD, EOS = "<pad>", "<eos>"
SPECIALS = (PAD, EOS)


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokeniser."""

    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int] | torch.Tensor) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...
    def save(self, path: str | Path) -> None: ...


class _JsonFile:
    """``save``/``load`` as a JSON file of ``to_dict()``, shared by both tokenisers."""

    def save(self, path: str | Path) -> None:
        """Write ``to_dict()`` as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")  # type: ignore[attr-defined]

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read back a tokeniser written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))  # type: ignore[attr-defined]


def _as_ints(ids: Iterable[int] | torch.Tensor) -> list[int]:
    return ids.flatten().tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


class CharTokenizer(_JsonFile):
    """One token per character: ``<pad>`` = 0, ``<eos>`` = 1, then the sorted characters.

    ``encode`` raises ``ValueError`` on a character that is not in the vocabulary (there is
    no ``<unk>``: silently mapping text to an unknown token would hide a wrong corpus).
    """

    pad_id = 0
    eos_id = 1

    def __init__(self, chars: Sequence[str]) -> None:
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct single characters")
        self.chars = list(chars)
        self.itos = [*SPECIALS, *self.chars]
        self.stoi = {c: i for i, c in enumerate(self.chars, start=len(SPECIALS))}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from every distinct character of ``text``."""
        if not text:
            raise ValueError("cannot build a CharTokenizer from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Map each character to its id."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self.stoi.keys())
            raise ValueError(
                f"characters {unknown[:10]!r} are not in this tokenizer's vocabulary; build it with "
                f"CharTokenizer.from_text() on text that contains them"
            ) from None

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Map ids back to text, skipping ``<pad>`` and ``<eos>``."""
        out = []
        for i in _as_ints(ids):
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} is outside the vocabulary (0..{len(self.itos) - 1})")
            if i >= len(SPECIALS):
                out.append(self.itos[i])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (``{"type": "char", "chars": [...]}``) for files and checkpoints."""
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        """Rebuild from :meth:`to_dict`."""
        if d.get("type") != "char":
            raise ValueError(f"not a CharTokenizer dict (type={d.get('type')!r})")
        return cls(d["chars"])

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class BPETokenizer(_JsonFile):
    """A byte-level BPE tokeniser (a ``tokenizers.Tokenizer``) with the CharTokenizer interface.

    Byte-level means every string can be encoded (no unknown characters) and decoding
    round-trips exactly, even for text that spells a special token such as ``"<eos>"``. Build one with :func:`train_bpe_tokenizer`.
    """

    pad_id = 0
    eos_id = 1

    def __init__(self, tokenizer: Any) -> None:
        for token, expected in zip(SPECIALS, (self.pad_id, self.eos_id), strict=True):
            if tokenizer.token_to_id(token) != expected:
                raise ValueError(f"the tokenizer must map {token} to id {expected}")
        # The text "<eos>" in a document is text, not the special token: encode it as bytes,
        # so decoding round-trips every string (the flag is not saved, so it is set here).
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Map text to ids (any string: byte-level, no unknown characters)."""
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Map ids back to text, skipping ``<pad>`` and ``<eos>``."""
        return self.tokenizer.decode(_as_ints(ids), skip_special_tokens=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (the ``tokenizers`` JSON under ``"tokenizer"``) for files and checkpoints."""
        return {"type": "bpe", "tokenizer": json.loads(self.tokenizer.to_str())}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        """Rebuild from :meth:`to_dict`."""
        from tokenizers import Tokenizer as HFTokenizer

        if d.get("type") != "bpe":
            raise ValueError(f"not a BPETokenizer dict (type={d.get('type')!r})")
        return cls(HFTokenizer.from_str(json.dumps(d["tokenizer"])))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def train_bpe_tokenizer(text: str, vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE tokeniser on ``text`` (about a second for 1 MB; offline).

    The 256 byte symbols and the two specials are always in the vocabulary, so
    ``vocab_size`` must be at least 258; merges learned from ``text`` fill the rest (the
    result may be smaller than ``vocab_size`` when the text has fewer distinct merges).
    """
    try:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError as err:
        raise ImportError("train_bpe_tokenizer needs the `tokenizers` package: pip install tokenizers") from err
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + len(SPECIALS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum}")
    if not text:
        raise ValueError("cannot train a tokenizer on empty text")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return BPETokenizer(tokenizer)


def tokenizer_from_dict(d: dict[str, Any]) -> CharTokenizer | BPETokenizer:
    """Rebuild either tokeniser from its ``to_dict()`` (for checkpoints)."""
    kinds = {"char": CharTokenizer, "bpe": BPETokenizer}
    if d.get("type") not in kinds:
        raise ValueError(f"unknown tokenizer type {d.get('type')!r}; expected one of {sorted(kinds)}")
    return kinds[d["type"]].from_dict(d)


def load_tokenizer(path: str | Path) -> CharTokenizer | BPETokenizer:
    """Load either tokeniser from a JSON file written by its ``save()``."""
    return tokenizer_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
