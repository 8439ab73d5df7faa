"""KV-cache generation (GPT.generate) against the uncached path that recomputes every position."""

from __future__ import annotations

import pytest
import torch

from course_lib.model import GPT, GPTConfig, LayerKVCache


def make_model(dtype: torch.dtype = torch.float32, block_size: int = 16) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config).to(dtype).eval()
    with torch.no_grad():  # larger weights than the init: sharper, more varied next-token choices
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model


def prompt(batch: int = 3, length: int = 5) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(1))


def cached_logits(model: GPT, ids: torch.Tensor, steps: list[int]) -> list[torch.Tensor]:
    """Last-position logits after feeding ``ids`` to a cache in chunks of the given sizes."""
    caches, out, start = [LayerKVCache() for _ in model.blocks], [], 0
    for n in steps:
        x = model.embed(ids[:, start:start + n], start=start)
        for block, cache in zip(model.blocks, caches, strict=True):
            x = block(x, None, cache)
        out.append(model.head(x))
        start += n
    return out


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cached_logits_equal_the_full_forward_at_every_position(dtype, atol):
    model = make_model(dtype)
    ids = prompt(length=12)
    with torch.no_grad():
        full = model(ids).logits
        # a prefill of 5 positions, single tokens, then a chunk of 3 (the shifted causal mask)
        chunks = cached_logits(model, ids, [5, 1, 1, 1, 1, 3])
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_greedy_tokens_equal_the_uncached_path(dtype):
    model = make_model(dtype)
    ids = prompt()
    cached = model.generate(ids, 10, temperature=0)
    uncached = model.generate(ids, 10, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached[:, 5:].flatten().tolist())) > 3  # not a degenerate repeat of one token


def test_sampling_with_a_fixed_seed_is_identical():
    model = make_model(torch.float64)
    ids = prompt()
    runs = [model.generate(ids, 12, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7),
                           use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])
    other = model.generate(ids, 12, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)  # the seed matters: the test could fail


def test_generation_past_block_size_slides_the_window_like_the_uncached_path():
    model = make_model(torch.float64, block_size=8)
    ids = prompt(length=5)
    cached = model.generate(ids, 12, temperature=0)  # 17 tokens: 9 past the 8-token context
    assert cached.shape == (3, 17)
    assert torch.equal(cached, model.generate(ids, 12, temperature=0, use_cache=False))
    long_prompt = prompt(length=11)  # a prompt already longer than the context
    assert torch.equal(model.generate(long_prompt, 3, temperature=0),
                       model.generate(long_prompt, 3, temperature=0, use_cache=False))


def test_the_cache_grows_one_position_per_token_and_embed_rejects_overflow():
    model = make_model(block_size=8)
    cache = LayerKVCache()
    assert cache.length == 0
    ids = prompt(length=8)
    with torch.no_grad():
        x = model.embed(ids[:, :6])
        model.blocks[0].attn(model.blocks[0].ln_1(x), None, cache)
        assert cache.length == 6 and cache.k.shape == (3, 2, 6, 8)
        model.blocks[0].attn(model.blocks[0].ln_1(model.embed(ids[:, 6:7], start=6)), None, cache)
        assert cache.length == 7
    with pytest.raises(ValueError, match="exceeds block_size=8"):
        model.embed(ids[:, :2], start=7)
