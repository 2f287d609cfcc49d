"""Character-level training data for verification, from the shipped corpus (stdlib docstrings, ~410 KB).

The vocabulary is fixed (newline + printable ASCII, 96 symbols) rather than read off the text, so token ids
never depend on which slice of the corpus is loaded. Batch samplers are infinite iterators whose randomness
comes only from the passed (CPU) torch.Generator, so a run is reproducible from its seed; the batches
themselves are placed on `device`.
"""

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

CORPUS_PATH = Path(__file__).with_name("corpus.txt")
Device = torch.device | str
SYMBOLS = "\n" + "".join(chr(code) for code in range(32, 127))


class CharVocab:
    """Fixed character vocabulary: newline plus printable ASCII, id = position in SYMBOLS."""

    def __init__(self):
        self.symbols = SYMBOLS
        self.table = torch.full((128,), -1, dtype=torch.long)
        self.table[torch.tensor([ord(c) for c in SYMBOLS])] = torch.arange(len(SYMBOLS))

    @property
    def size(self) -> int:
        """Number of symbols."""
        return len(self.symbols)

    def encode(self, text: str) -> torch.Tensor:
        """Return text's ids as a 1-D LongTensor; raise ValueError on a character outside the vocabulary."""
        if unknown := set(text) - set(self.symbols):
            raise ValueError(f"text has characters outside the vocabulary: {sorted(unknown)}")
        return self.table[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Return the text for a sequence of ids."""
        return "".join(self.symbols[i] for i in torch.as_tensor(ids).tolist())


def load_corpus() -> str:
    """Return the full shipped corpus text."""
    return CORPUS_PATH.read_text(encoding="ascii")


def split_corpus(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Split text into (train, validation): the validation set is the last `val_fraction` of characters."""
    cut = round(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def _windows(
    text: str, length: int, batch_size: int, generator: torch.Generator, device: Device
) -> Iterator[torch.Tensor]:
    """Yield forever [batch_size, length] id windows starting at uniformly random offsets into text."""
    data = CharVocab().encode(text).to(device)
    if len(data) < length:
        raise ValueError(f"text of {len(data)} characters is shorter than a window of {length}")
    span = torch.arange(length, device=device)
    while True:
        starts = torch.randint(len(data) - length + 1, (batch_size, 1), generator=generator)
        yield data[starts.to(device) + span]


def char_batches(
    text: str, block_size: int, batch_size: int, generator: torch.Generator, device: Device = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield forever (x, y) LongTensors [batch_size, block_size] for the GPT; y is x shifted by one char."""
    for window in _windows(text, block_size + 1, batch_size, generator, device):
        yield window[:, :-1], window[:, 1:]


def context_batches(
    text: str, context: int, batch_size: int, generator: torch.Generator, device: Device = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield forever (x, y) for the MLP: x [batch, context * vocab] one-hot previous chars, y [batch] next."""
    vocab_size = CharVocab().size
    for window in _windows(text, context + 1, batch_size, generator, device):
        yield F.one_hot(window[:, :-1], vocab_size).flatten(1).float(), window[:, -1]
