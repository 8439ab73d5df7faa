"""The data pipeline: corpora, tokenisers, windows, padding, packing, dynamic batching."""

from __future__ import annotations

import json
import re

import pytest
import torch

from course_lib.data import (
    CharTokenizer,
    RandomWindowBatches,
    encode_corpus,
    eval_windows,
    load_corpus,
    load_tokenizer,
    tokenizer_from_dict,
    train_bpe_tokenizer,
    train_val_split,
)

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
    for text in (train_text[:3000], load_corpus("python_docs")[:3000], "  naïve café — 東京\t\n\n x"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode([tok.eos_id, *ids, tok.pad_id]) == text
    ids = tok.encode(train_text[:20_000])
    assert len(ids) < 0.5 * 20_000, "merges learned on this text make it shorter than characters"
    path = tmp_path / "bpe.json"
    tok.save(path)
    again = load_tokenizer(path)
    assert type(again) is type(tok) and again.encode(train_text[:3000]) == tok.encode(train_text[:3000])
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
