"""course_lib.pretrained: a model exported as safetensors + JSON loads back equal, still tied."""

import pytest
import torch

from course_lib.data import CharTokenizer
from course_lib.model import GPT, GPTConfig
from course_lib.pretrained import export_pretrained, load_pretrained, pretrained_metadata


def test_export_and_load_pretrained(tmp_path):
    tok = CharTokenizer.from_text("hello world")
    model = GPT(GPTConfig.from_preset("nano", tok.vocab_size))
    export_pretrained(model, tok, tmp_path, "toy", val_loss=1.5, command="python -m course_lib train ...")
    loaded, tok2 = load_pretrained("toy", directory=tmp_path)
    assert tok2.encode("hello") == tok.encode("hello")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied after loading
    assert pretrained_metadata("toy", tmp_path)["val_loss"] == 1.5
    with pytest.raises(FileNotFoundError, match="make pretrained"):
        load_pretrained("nope", directory=tmp_path)

