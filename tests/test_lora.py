"""LoRA: B = 0 at start, frozen base, merge/unmerge, adapter-only state dict, parity with PEFT."""

import copy

import pytest
import torch
import torch.nn as nn

from course_lib.lora import (
    LoRALinear,
    apply_lora,
    count_trainable_parameters,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from course_lib.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16)


class TwoLayer(nn.Module):
    """A small base whose targets sit directly on the model (no dot in their names: Errata 9)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 24)
        self.v_proj = nn.Linear(24, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.v_proj(torch.relu(self.q_proj(x)))))


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (3, 16), generator=g)


def _randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_output_unchanged_at_init():
    base = GPT(CONFIG)
    lora = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    ids = _ids()
    torch.testing.assert_close(lora(ids).logits, base(ids).logits, rtol=0, atol=0)
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in lora_layers(lora))
    assert all(torch.count_nonzero(layer.lora_A) > 0 for layer in lora_layers(lora))


def test_only_lora_parameters_get_gradients():
    model = apply_lora(GPT(CONFIG), rank=4, alpha=8, target_modules=("q_proj", "v_proj", "fc_in"))
    assert len(lora_layers(model)) == 3 * CONFIG.n_layer
    model(_ids(), labels=_ids(1)).loss.backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name  # never computed nor stored
    d, r = CONFIG.n_embd, 4
    assert count_trainable_parameters(model) == CONFIG.n_layer * (2 * r * (d + d) + r * (d + 4 * d))


def test_merged_equals_unmerged_and_unmerge_restores():
    model = apply_lora(GPT(CONFIG), rank=4, alpha=16)
    _randomise_b(model)
    base_weights = {n: p.clone() for n, p in model.named_parameters() if "base" in n}
    ids = _ids()
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_lora(model)
        assert all(layer.merged for layer in lora_layers(model))
        merged = model(ids).logits
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
        assert not torch.equal(model.blocks[0].attn.q_proj.base.weight, base_weights["blocks.0.attn.q_proj.base.weight"])
        unmerge_lora(model)
        for n, p in model.named_parameters():
            if n in base_weights:
                torch.testing.assert_close(p, base_weights[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=0, atol=1e-5)


def test_adapter_state_dict_round_trips():
    base = GPT(CONFIG)
    trained = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    _randomise_b(trained)
    sd = lora_state_dict(trained)
    assert sd and all(k.endswith(("lora_A", "lora_B")) for k in sd)
    assert sum(v.numel() for v in sd.values()) == count_trainable_parameters(trained)
    fresh = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    assert not torch.allclose(fresh(_ids()).logits, trained(_ids()).logits)
    load_lora_state_dict(fresh, sd)
    torch.testing.assert_close(fresh(_ids()).logits, trained(_ids()).logits, rtol=0, atol=0)
    other = apply_lora(copy.deepcopy(base), rank=4, alpha=8, target_modules=("k_proj",))
    with pytest.raises(KeyError, match="apply_lora"):
        load_lora_state_dict(other, sd)


def test_top_level_targets_and_errors():
    model = apply_lora(TwoLayer(), rank=2, alpha=4)
    assert isinstance(model.q_proj, LoRALinear) and isinstance(model.v_proj, LoRALinear)
    assert isinstance(model.out, nn.Linear)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, rank=2, alpha=4)
    with pytest.raises(ValueError, match="linear layers here"):
        apply_lora(TwoLayer(), rank=2, alpha=4, target_modules=("c_attn",))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRALinear(nn.Linear(2, 2), rank=0, alpha=1)
    with pytest.raises(ValueError, match="alpha must be positive"):
        LoRALinear(nn.Linear(2, 2), rank=2, alpha=0)
    with pytest.raises(ValueError, match="the model itself is a target"):
        apply_lora(TwoLayer(), rank=2, alpha=4, target_modules=("",))


def test_dropout_only_on_the_adapter_path():
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=2, dropout=0.5)
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), layer.base(x))  # B = 0: dropout cannot change the output yet
    layer.eval()
    _randomise_b(layer)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T)


def test_parity_with_peft():
    peft = pytest.importorskip("peft")
    base = TwoLayer()
    ours = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    _randomise_b(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            target = getattr(theirs.base_model.model, name)
            target.lora_A["default"].weight.copy_(getattr(ours, name).lora_A)
            target.lora_B["default"].weight.copy_(getattr(ours, name).lora_B)
            assert target.scaling["default"] == getattr(ours, name).scaling
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    trainable, _ = theirs.get_nb_trainable_parameters()
    assert count_trainable_parameters(ours) == trainable
    # merged, both agree too
    merge_lora(ours)
    torch.testing.assert_close(ours(x), theirs.merge_and_unload()(x), rtol=0, atol=1e-6)


def test_notebook_scratch_lora_equals_course_lib():
    """Notebook 07 writes LoRA from scratch; it must compute what course_lib.lora.LoRALinear computes."""
    import json
    import math
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "notebooks" / "07_lora.ipynb"
    cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    (source,) = [s for s in cells if s.lstrip().startswith("class ScratchLoRALinear")]
    namespace = {"torch": torch, "nn": nn, "math": math}
    exec(source, namespace)
    base = nn.Linear(12, 20)
    torch.manual_seed(3)
    scratch = namespace["ScratchLoRALinear"](copy.deepcopy(base), rank=3, alpha=6)
    torch.manual_seed(3)
    ours = LoRALinear(copy.deepcopy(base), rank=3, alpha=6)
    torch.testing.assert_close(scratch.lora_A, ours.lora_A, rtol=0, atol=0)  # same init, same RNG draws
    assert torch.count_nonzero(scratch.lora_B) == 0 and not scratch.base.weight.requires_grad
    with torch.no_grad():
        b = torch.randn(20, 3)
        scratch.lora_B.copy_(b)
        ours.lora_B.copy_(b)
    x = torch.randn(5, 12)
    torch.testing.assert_close(scratch(x), ours(x), rtol=0, atol=1e-6)


def test_merged_state_survives_save_and_load(tmp_path):
    from course_lib.checkpoint import load_checkpoint, save_checkpoint

    base = GPT(CONFIG)
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=16)
    _randomise_b(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        merge_lora(model)
    save_checkpoint(tmp_path / "merged.pt", model=model.state_dict())
    fresh = apply_lora(copy.deepcopy(base), rank=4, alpha=16)
    fresh.load_state_dict(load_checkpoint(tmp_path / "merged.pt")["model"])
    assert all(layer.merged for layer in lora_layers(fresh))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=1e-5)  # the update applied once
        unmerge_lora(fresh)
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(fresh.blocks[0].attn.q_proj.base.weight, base.blocks[0].attn.q_proj.weight,
                               rtol=0, atol=1e-6)


def test_a_merged_model_refuses_backward_with_a_helpful_message():
    model = apply_lora(GPT(CONFIG), rank=4, alpha=8)
    _randomise_b(model)
    merge_lora(model)
    with torch.no_grad():
        assert torch.isfinite(model(_ids(), labels=_ids(1)).loss)  # inference is fine
    loss = model(_ids(), labels=_ids(1)).loss
    with pytest.raises(RuntimeError, match=r"merged LoRA layer.*unmerge_lora\(model\).*merge_and_unload"):
        loss.backward()
    unmerge_lora(model)
    model(_ids(), labels=_ids(1)).loss.backward()  # unmerged, the adapters train again
    assert all(layer.lora_A.grad is not None and layer.lora_B.grad is not None for layer in lora_layers(model))


def test_merge_and_unload_gives_the_plain_base_model():
    base = GPT(CONFIG)
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, target_modules=("q_proj", "v_proj", "fc_out"))
    _randomise_b(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    plain = merge_and_unload(model)
    assert not lora_layers(plain) and list(plain.state_dict()) == list(base.state_dict())
    reloaded = GPT(CONFIG)
    reloaded.load_state_dict(plain.state_dict())  # strict: a plain GPT again
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-5)
    assert reloaded.lm_head.weight is reloaded.wte.weight


def test_merge_and_unload_matches_peft():
    peft = pytest.importorskip("peft")
    base = TwoLayer()
    ours = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    _randomise_b(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            target = getattr(theirs.base_model.model, name)
            target.lora_A["default"].weight.copy_(getattr(ours, name).lora_A)
            target.lora_B["default"].weight.copy_(getattr(ours, name).lora_B)
    ours, theirs = merge_and_unload(ours), theirs.merge_and_unload()
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
    for (n, a), (m, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert n == m and a.requires_grad == b.requires_grad
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_tied_target_is_refused_and_untying_it_as_peft_recommends_works():
    model = GPT(CONFIG)
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to wte.weight.*nn.Parameter"):
        apply_lora(model, rank=2, alpha=4, target_modules=("q_proj", "lm_head"))
    assert not lora_layers(model)  # refused before anything was replaced
    embedding = model.wte.weight.detach().clone()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # the untie the message gives
    apply_lora(model, rank=2, alpha=4, target_modules=("lm_head",))
    _randomise_b(model)
    merge_and_unload(model)
    assert torch.equal(model.wte.weight, embedding)  # the embedding is untouched
    assert not torch.equal(model.lm_head.weight, embedding)


def test_peft_merges_an_adapter_on_a_tied_head_into_the_embedding():
    """The reference behind refusing tied targets: PEFT warns, and its merge rewrites the embedding."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1,
                                                              n_head=2, bos_token_id=0, eos_token_id=0))
    embedding = hf.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        tuned = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"],
                                                        init_lora_weights=False))
    with pytest.warns(UserWarning, match="tie"):
        merged = tuned.merge_and_unload()
    assert not torch.equal(merged.transformer.wte.weight, embedding)
