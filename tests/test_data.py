"""The data pipeline: corpora, tokenisers, windows, padding, packing, dynamic batching."""

from __future__ import annotations

import json
import re

import pytest
import torch

from course_lib.data import (
    CharTokenizer,
    DynamicBatchSampler,
    LLMDataset,
    RandomWindowBatches,
    collate_padded,
    encode_corpus,
    eval_windows,
    load_corpus,
    load_tokenizer,
    pack_sequences,
    padding_waste,
    tokenizer_from_dict,
    train_bpe_tokenizer,
    train_val_split,
)
from course_lib.model import GPT, GPTConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids thread spin-up costs on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SAMPLE = "ROMEO:\nBut soft, what light through yonder window breaks?\n\nJULIET:\nAy me!\n"


# ---------------------------------------------------------------- corpora
def test_shakespeare_corpus_is_bundled_plain_text():
    text = load_corpus("shakespeare")
    assert 1_000_000 < len(text) < 1_300_000
    assert text.startswith("THESEUS:\nNow, fair Hippolyta")
    # plain text: no Markdown markup left, and every speech starts with "SPEAKER:"
    assert not re.search(r"[_*#\\]", text)
    speeches = text.split("\n\n")
    assert all(re.match(r"^[^\n]+:\n\S", s) for s in speeches), "every block is SPEAKER: then lines"
    assert 60 <= len(set(text)) <= 100


def test_python_docs_corpus_is_pydoc_topics_in_sorted_order():
    from pydoc_data.topics import topics

    text = load_corpus("python_docs")
    assert text == "\n\n".join(topics[k] for k in sorted(topics))


def test_unknown_corpus_lists_choices():
    with pytest.raises(ValueError, match="python_docs.*shakespeare"):
        load_corpus("wikipedia")


def test_encode_corpus_round_trips_with_its_char_tokenizer():
    tokens, tok = encode_corpus("shakespeare")
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokens.numel() == len(load_corpus("shakespeare"))
    assert tok.decode(tokens[:5000]) == load_corpus("shakespeare")[:5000]


# ---------------------------------------------------------------- tokenisers
def test_char_tokenizer_layout_round_trip_and_json(tmp_path):
    tok = CharTokenizer.from_text(SAMPLE)
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    assert tok.vocab_size == 2 + len(set(SAMPLE))
    ids = tok.encode(SAMPLE)
    assert ids[:2] == [2 + sorted(set(SAMPLE)).index("R"), 2 + sorted(set(SAMPLE)).index("O")]
    assert min(ids) >= 2 and tok.decode(ids) == SAMPLE
    assert tok.decode([tok.pad_id, *ids, tok.eos_id, tok.pad_id]) == SAMPLE  # specials skipped
    assert tok.decode(torch.tensor(ids)) == SAMPLE
    json.dumps(tok.to_dict())
    path = tmp_path / "tok.json"
    tok.save(path)
    for again in (CharTokenizer.load(path), load_tokenizer(path), tokenizer_from_dict(tok.to_dict())):
        assert isinstance(again, CharTokenizer) and again.encode(SAMPLE) == ids


def test_char_tokenizer_rejects_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"\['z'\].*from_text"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([99])
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")


def test_bpe_tokenizer_round_trips_exactly_and_compresses(tmp_path):
    train_text = load_corpus("shakespeare")[:200_000]
    tok = train_bpe_tokenizer(train_text, vocab_size=600)
    assert tok.vocab_size == 600 and (tok.pad_id, tok.eos_id) == (0, 1)
    # exact round trip, also on text it never saw (another domain, unicode, odd spacing)
    for text in (train_text[:3000], load_corpus("python_docs")[:3000], "  naïve café — 東京\t\n\n x", "a <eos> b <pad>"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode([tok.eos_id, *ids, tok.pad_id]) == text
    ids = tok.encode(train_text[:20_000])
    assert len(ids) < 0.5 * 20_000, "merges learned on this text make it shorter than characters"
    path = tmp_path / "bpe.json"
    tok.save(path)
    again = load_tokenizer(path)
    assert type(again) is type(tok) and again.encode(train_text[:3000]) == tok.encode(train_text[:3000])
    assert again.decode(again.encode("x <eos> y")) == "x <eos> y"
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe_tokenizer(train_text, vocab_size=100)


# ---------------------------------------------------------------- split and windows
def test_train_val_split_is_contiguous_without_overlap():
    tokens = torch.arange(1000)
    train, val = train_val_split(tokens, val_fraction=0.1)
    assert train.numel() == 900 and val.numel() == 100
    assert torch.equal(torch.cat([train, val]), tokens)
    assert not set(train.tolist()) & set(val.tolist())
    with pytest.raises(ValueError, match="block_size"):
        train_val_split(tokens, val_fraction=0.1, block_size=128)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        train_val_split(tokens, val_fraction=1.0)


def test_random_windows_have_shifted_labels_and_cover_the_stream():
    tokens = torch.arange(50)
    batches = RandomWindowBatches(tokens, block_size=8, batch_size=16, seed=1)
    starts = set()
    for _ in range(50):
        b = next(batches)
        x, y = b["input_ids"], b["labels"]
        assert x.shape == y.shape == (16, 8) and x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1), "labels are the inputs shifted by one"
        assert torch.equal(x - x[:, :1], torch.arange(8).expand(16, 8)), "windows are contiguous"
        starts.update(x[:, 0].tolist())
    assert starts == set(range(50 - 8)), "every start that has a label is drawn, no other"


def test_random_windows_resume_exactly_whatever_the_global_rng():
    tokens = torch.randint(0, 100, (5000,))
    ref = RandomWindowBatches(tokens, block_size=16, batch_size=4, seed=7)
    expected = [next(ref)["input_ids"] for _ in range(10)]
    first = RandomWindowBatches(tokens, block_size=16, batch_size=4, seed=7)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"position": 6, "seed": 7}
    torch.manual_seed(12345)  # global RNG disturbed: must not matter
    torch.rand(10)
    resumed = RandomWindowBatches(tokens, block_size=16, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    for i in range(6, 10):
        assert torch.equal(next(resumed)["input_ids"], expected[i])
    other_seed = RandomWindowBatches(tokens, block_size=16, batch_size=4, seed=8)
    assert not torch.equal(next(other_seed)["input_ids"], expected[0])


def test_window_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="too short"):
        RandomWindowBatches(torch.arange(8), block_size=8, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        RandomWindowBatches(torch.arange(100), block_size=8, batch_size=0)
    with pytest.raises(ValueError, match="1-D"):
        RandomWindowBatches(torch.zeros(2, 100, dtype=torch.long), block_size=8, batch_size=2)
    with pytest.raises(ValueError, match="long"):
        RandomWindowBatches(torch.arange(100.0), block_size=8, batch_size=2)


def test_eval_windows_are_deterministic_non_overlapping_and_complete():
    tokens = torch.arange(101)
    batches = eval_windows(tokens, block_size=10, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 3, 1]
    inputs = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert torch.equal(inputs.flatten(), torch.arange(100)), "every token once, no overlap"
    assert torch.equal(labels, inputs + 1)
    assert len(eval_windows(tokens, 10, 3, max_batches=2)) == 2
    again = eval_windows(tokens, block_size=10, batch_size=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))


# ---------------------------------------------------------------- documents: padding
class CountingTokenizer(CharTokenizer):
    """A CharTokenizer that counts how many texts it encodes."""

    calls = 0

    def encode(self, text: str) -> list[int]:
        CountingTokenizer.calls += 1
        return super().encode(text)


def _docs() -> list[str]:
    return [s for s in load_corpus("shakespeare")[:20_000].split("\n\n") if s][:40]


def test_llm_dataset_shifts_truncates_and_tokenises_once():
    docs = _docs()
    tok = CountingTokenizer.from_text("".join(docs))
    CountingTokenizer.calls = 0
    ds = LLMDataset(["", *docs], tok, max_length=64)
    assert CountingTokenizer.calls == len(docs) + 1
    assert len(ds) == len(docs) and ds.num_skipped == 1, "the empty document gives no pair"
    for _ in range(3):
        for i in range(len(ds)):
            ds[i]
    assert CountingTokenizer.calls == len(docs) + 1, "items are not tokenised again"
    for text, item, n in zip(docs, ds, ds.lengths, strict=True):
        ids = (tok.encode(text) + [tok.eos_id])[:65]
        assert n == len(ids) - 1 <= 64
        assert item["input_ids"].tolist() == ids[:-1] and item["labels"].tolist() == ids[1:]
    assert max(ds.lengths) == 64 and min(ds.lengths) < 64
    with pytest.raises(ValueError, match="no usable documents"):
        LLMDataset([], tok, max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        LLMDataset(docs, tok, max_length=0)


def test_collate_labels_are_ignored_exactly_on_padding():
    tok = CharTokenizer.from_text("".join(_docs()))
    ds = LLMDataset(_docs()[:6], tok, max_length=50)
    batch = ds.collate([ds[i] for i in range(6)])
    lengths = torch.tensor(ds.lengths[:6])
    width = int(lengths.max())
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (6, width)
    padding = torch.arange(width)[None, :] >= lengths[:, None]
    assert padding.any(), "the test needs some padding"
    assert torch.equal(batch["labels"] == -100, padding)
    assert torch.equal(batch["input_ids"][padding], torch.full((int(padding.sum()),), tok.pad_id))
    assert torch.equal(batch["attention_mask"], (~padding).long())
    for row in range(6):
        n = ds.lengths[row]
        assert torch.equal(batch["labels"][row, :n], ds[row]["labels"])


def test_padded_batch_loss_equals_the_unpadded_per_document_loss():
    """Reference: each document alone, no padding, in float64; token-weighted mean."""
    tok = CharTokenizer.from_text("".join(_docs()))
    ds = LLMDataset(_docs()[:5], tok, max_length=64)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).double()
    model.eval()
    batch = ds.collate([ds[i] for i in range(5)])
    assert len(set(ds.lengths[:5])) > 1, "the test needs documents of different lengths"
    padded_loss = model(**batch).loss
    total = sum(  # float64 cross-entropy of each document alone
        torch.nn.functional.cross_entropy(model(ds[i]["input_ids"][None]).logits[0], ds[i]["labels"], reduction="sum")
        for i in range(5)
    )
    reference = (total / sum(ds.lengths[:5])).item()
    assert padded_loss.item() == pytest.approx(reference, rel=1e-6)  # model's loss is float32
    wrong = batch["labels"].clone()  # the tutorial's bug: labels padded with the pad id
    wrong[wrong == -100] = tok.pad_id
    assert abs(model(batch["input_ids"], labels=wrong).loss - reference) > 1e-3


def test_attention_mask_comes_from_lengths_when_pad_equals_eos():
    eos = 1
    items = [  # documents that contain <eos> inside (e.g. several turns joined by <eos>)
        {"input_ids": torch.tensor([5, 6, eos, 7, 8]), "labels": torch.tensor([6, eos, 7, 8, eos])},
        {"input_ids": torch.tensor([9, eos]), "labels": torch.tensor([eos, 4])},
    ]
    batch = collate_padded(items, pad_id=eos)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[6, eos, 7, 8, eos], [eos, 4, -100, -100, -100]]
    from_ids = (batch["input_ids"] != eos).long()  # the tutorial's mask: hides real <eos> tokens
    assert not torch.equal(from_ids, batch["attention_mask"])
    with pytest.raises(ValueError, match="empty"):
        collate_padded([], pad_id=0)


# ---------------------------------------------------------------- documents: packing
def test_packing_keeps_every_token_exactly_once_without_padding():
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, 50, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (30,), generator=g)]
    stream = [t for d in docs for t in (*d, 1)]
    packed = pack_sequences(docs, block_size=16, eos_id=1)
    x, y = packed["input_ids"], packed["labels"]
    n = x.shape[0]
    assert x.shape == y.shape == (n, 16) and x.dtype == torch.long
    assert x.flatten().tolist() == stream[: n * 16], "each kept token is an input exactly once, in order"
    assert y.flatten().tolist() == stream[1 : n * 16 + 1], "labels are the next stream token"
    assert 0 < len(stream) - n * 16 <= 16, "only a tail shorter than a row is dropped"
    assert (x == 1).sum() == sum(t == 1 for t in stream[: n * 16]), "eos separators kept"
    assert not (y == -100).any(), "no padding at all"
    with pytest.raises(ValueError, match="smaller block_size"):
        pack_sequences([[3, 4]], block_size=8, eos_id=1)


# ---------------------------------------------------------------- documents: dynamic batching
def _lengths(n: int = 300) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(1, 200, (n,), generator=g)).tolist()


def test_padding_waste_by_hand():
    lengths = [1, 2, 3, 4]
    assert padding_waste([[0, 3], [1, 2]], lengths) == pytest.approx(1 - 10 / 14)
    assert padding_waste([[0], [1], [2], [3]], lengths) == 0.0
    assert padding_waste([torch.tensor([0, 3]), torch.tensor([1, 2])], lengths) == pytest.approx(1 - 10 / 14)


def test_dynamic_batches_respect_the_budget_and_cover_every_index_once():
    lengths = _lengths()
    sampler = DynamicBatchSampler(lengths, max_tokens=1024, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 for b in batches)
    sizes = sorted(len(b) for b in batches)
    assert sizes[0] < sizes[-1], "short samples travel in larger batches"


def test_dynamic_batching_wastes_less_padding_than_random_batches_of_the_same_sizes():
    lengths = _lengths()
    batches = list(DynamicBatchSampler(lengths, max_tokens=1024, seed=0))
    dynamic = padding_waste(batches, lengths)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    cuts = torch.tensor([0] + [len(b) for b in batches]).cumsum(0).tolist()
    random_batches = [perm[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    random_waste = padding_waste(random_batches, lengths)
    assert dynamic < 0.1 < random_waste, (dynamic, random_waste)


def test_dynamic_batch_order_is_reproducible_per_epoch():
    lengths = _lengths()
    sampler = DynamicBatchSampler(lengths, max_tokens=1024, seed=5)
    sampler.set_epoch(0)
    e0 = list(sampler)
    assert list(sampler) == e0
    sampler.set_epoch(1)
    e1 = list(sampler)
    assert e1 != e0 and len(e1) == len(e0)
    again = DynamicBatchSampler(lengths, max_tokens=1024, seed=5)
    again.set_epoch(1)
    assert list(again) == e1
    fixed = DynamicBatchSampler(lengths, max_tokens=1024, shuffle=False)
    order = [lengths[b[0]] for b in fixed]
    assert order == sorted(order), "without shuffle, batches come shortest first"


def test_dynamic_batch_sampler_in_a_dataloader_gives_tensors_under_budget():
    docs = _docs()
    tok = CharTokenizer.from_text("".join(docs))
    ds = LLMDataset(docs, tok, max_length=128)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=DynamicBatchSampler(ds.lengths, max_tokens=512), collate_fn=ds.collate
    )
    seen = 0
    for batch in loader:
        assert isinstance(batch["input_ids"], torch.Tensor)
        assert batch["input_ids"].numel() <= 512
        seen += batch["attention_mask"].sum().item()
    assert seen == sum(ds.lengths)


def test_dynamic_batch_sampler_errors_and_drop_last():
    with pytest.raises(ValueError, match="raise max_tokens to at least 300"):
        DynamicBatchSampler([10, 300, 20], max_tokens=256)
    with pytest.raises(ValueError, match="empty"):
        DynamicBatchSampler([], max_tokens=256)
    # lengths 10 x5 then 100 x1, budget 100: [10]*5 fits (50 <= 100), the 100 fills a batch alone
    assert len(DynamicBatchSampler([10] * 5 + [100], max_tokens=100, drop_last=True)) == 2
    # the longest batch [50] could still take another 50: it ran out of samples, so it is dropped
    kept = list(DynamicBatchSampler([10, 10, 50], max_tokens=100, shuffle=False, drop_last=True))
    assert kept == [[0, 1]]
