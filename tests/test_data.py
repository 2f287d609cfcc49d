"""Tests for the verification data: corpus, fixed vocabulary, deterministic batches."""

import itertools
import string

import pytest
import torch

from mupderive.verify.data import SYMBOLS, CharVocab, char_batches, context_batches, load_corpus, split_corpus


def test_corpus_is_sizeable_english_text():
    text = load_corpus()
    assert 300_000 <= len(text) <= 600_000
    assert text.count(" ") > len(text) // 10
    for word in (" the ", " function ", " return "):
        assert word in text


def test_vocabulary_is_fixed_and_covers_corpus():
    vocab = CharVocab()
    printable = string.digits + string.ascii_letters + string.punctuation + " "
    assert vocab.symbols == SYMBOLS == "\n" + "".join(sorted(printable))
    assert vocab.size == len(set(SYMBOLS)) == 96
    text = load_corpus()
    assert set(text) <= set(SYMBOLS)
    ids = vocab.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert int(ids.min()) >= 0 and int(ids.max()) < vocab.size
    assert vocab.decode(ids[:5000]) == text[:5000]
    assert vocab.encode("\n a~").tolist() == [0, 1, SYMBOLS.index("a"), 95]
    for bad in ("tab\there", "caf\u00e9"):
        with pytest.raises(ValueError):
            vocab.encode(bad)


def test_split_is_deterministic_last_tenth():
    text = load_corpus()
    train, val = split_corpus(text)
    assert train + val == text
    assert abs(len(val) - len(text) / 10) <= 1
    assert split_corpus(text) == (train, val)


def take(batches, n):
    return list(itertools.islice(batches, n))


def test_char_batches_are_next_char_targets_and_deterministic():
    text = split_corpus(load_corpus())[0]
    first = take(char_batches(text, 32, 8, torch.Generator().manual_seed(1)), 3)
    again = take(char_batches(text, 32, 8, torch.Generator().manual_seed(1)), 3)
    other = take(char_batches(text, 32, 8, torch.Generator().manual_seed(2)), 3)
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], first[1][0])
    x, y = first[0]
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    vocab = CharVocab()
    for row_x, row_y in zip(x, y, strict=True):
        window = vocab.decode(row_x) + vocab.decode(row_y[-1:])
        assert window in text


def test_context_batches_one_hot_shape_and_targets():
    text = split_corpus(load_corpus())[1]
    vocab = CharVocab()
    batches = take(context_batches(text, 5, 16, torch.Generator().manual_seed(0)), 2)
    again = take(context_batches(text, 5, 16, torch.Generator().manual_seed(0)), 2)
    for (x, y), (x2, y2) in zip(batches, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    x, y = batches[0]
    assert x.shape == (16, 5 * vocab.size) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.long
    assert torch.equal(x.sum(1), torch.full((16,), 5.0))
    one_hot = x.view(16, 5, vocab.size)
    assert torch.equal(one_hot.sum(2), torch.ones(16, 5))
    for row, target in zip(one_hot.argmax(2), y, strict=True):
        assert vocab.decode(row) + vocab.decode([int(target)]) in text


def test_short_text_is_rejected():
    with pytest.raises(ValueError):
        next(char_batches("abc", 8, 2, torch.Generator()))
