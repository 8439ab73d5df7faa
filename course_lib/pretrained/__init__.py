"""The pretrained models later lessons fine-tune, stored here as safetensors plus a JSON file.

* :func:`export_pretrained` saves a model as ``<name>.safetensors`` (raw tensors, no pickle)
  and ``<name>.json`` (model config, tokenizer, metadata such as the validation loss and the
  command that made it);
* :func:`load_pretrained` loads one back: ``model, tokenizer = load_pretrained()``;
  :func:`pretrained_metadata` reads its JSON file only.

The course ships ``shakespeare_tiny`` (``make pretrained`` rebuilds it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from course_lib.data import tokenizer_from_dict
from course_lib.model import GPT, GPTConfig

PRETRAINED_DIR = Path(__file__).parent  # the shipped weights lie next to this file


def export_pretrained(model: torch.nn.Module, tokenizer: Any, directory: str | os.PathLike, name: str,
                      **metadata: Any) -> Path:
    """Save ``model`` as ``<name>.safetensors`` and ``<name>.json`` (model config, tokenizer, metadata).

    Safetensors holds raw tensors only (no pickle); the tied head is stored once.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    save_model(model, str(weights))
    meta = {"model": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), **metadata}
    (directory / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return weights


def pretrained_metadata(name: str = "shakespeare_tiny", directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``<name>.json`` written by :func:`export_pretrained` (config, tokenizer, val loss, command)."""
    directory = PRETRAINED_DIR if directory is None else Path(directory)
    meta = directory / f"{name}.json"
    if not meta.is_file():
        available = sorted(p.stem for p in directory.glob("*.safetensors")) if directory.is_dir() else []
        raise FileNotFoundError(
            f"no pretrained model {name!r} in {directory} (available: {available or 'none'}); "
            "build it with `make pretrained`"
        )
    return json.loads(meta.read_text())


def load_pretrained(name: str = "shakespeare_tiny", directory: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu"):
    """Load a pretrained model and its tokenizer: ``model, tokenizer = load_pretrained()``.

    The course ships ``shakespeare_tiny`` (the ``tiny`` preset trained on the ``shakespeare``
    corpus by ``make pretrained``); its ``<name>.json`` records the validation loss and the
    command that made it. The model comes back in eval mode.
    """
    directory = PRETRAINED_DIR if directory is None else Path(directory)
    meta = pretrained_metadata(name, directory)
    model = GPT(GPTConfig(**meta["model"]))
    load_model(model, str(directory / f"{name}.safetensors"), device=str(device))
    return model.to(device).eval(), tokenizer_from_dict(meta["tokenizer"])
