"""CLIP's tokenizer (Radford et al. 2021), as GLIDE's noised CLIP reads captions.

``load_clip_tokenizer(bpe_path)`` reproduces glide-text2im's
``tokenizer.simple_tokenizer.SimpleTokenizer`` (OpenAI CLIP's) exactly:

* the vocabulary is the 256 byte characters (GPT-2's ``bytes_to_unicode``
  order), the same 256 with the end-of-word marker ``</w>``, the first 48894
  merges of ``bpe_simple_vocab_16e6.txt.gz``, then ``<|startoftext|>`` and
  ``<|endoftext|>``: 49408 ids;
* ``encode`` cleans the text (ftfy, HTML unescaping twice, whitespace runs to
  one space, strip), lower-cases it, splits it with CLIP's pattern and applies
  the merges, the last symbol of each word carrying ``</w>``;
* ``padded_tokens_and_len(ids, text_ctx)`` = start token, ``ids[:text_ctx - 2]``,
  end token, zeros; the length counts start and end tokens.

ftfy (a dependency of the package, as of CLIP's) repairs mojibake and
normalises Unicode first, so non-ASCII captions tokenize as CLIP's do.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex

from diffusion_jax.bpe import bytes_to_unicode, read_text

START, END = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the file.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clean_text(text: str) -> str:
    """CLIP's ``basic_clean`` then ``whitespace_clean``, then lower case (what ``encode`` splits)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """CLIP's BPE (``SimpleTokenizer``).

    Attributes:
      n_vocab: 49408 for CLIP's vocabulary file.
      start_token, end_token: ids of ``<|startoftext|>`` and ``<|endoftext|>``.
    """

    def __init__(self, merges: Sequence[tuple[str, str]]):
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.n_vocab = len(vocab)
        self.start_token, self.end_token = self.encoder[START], self.encoder[END]
        self._byte_char = bytes_to_unicode()
        self._char_byte = {c: b for b, c in self._byte_char.items()}
        self._pattern = regex.compile(CLIP_PATTERN, regex.IGNORECASE)
        self._cache: dict[str, list[str]] = {START: [START], END: [END]}

    def bpe(self, word: str) -> list[str]:
        """Merge the symbols of one pre-token (byte characters), lowest merge rank first.

        Returns:
          the word's vocabulary entries; the last carries ``</w>``.
        """
        if word in self._cache:
            return self._cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols[:-1], symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids (no start/end tokens; ``<|startoftext|>`` in the text is the special id)."""
        ids = []
        for piece in self._pattern.findall(clean_text(text)):
            word = "".join(self._byte_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text: byte characters to UTF-8 (invalid bytes -> U+FFFD), then ``</w>`` -> space.

        Special tokens come back as their text (their characters are printable bytes).
        """
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self._char_byte[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def padded_tokens_and_len(self, ids: Sequence[int], text_ctx: int) -> tuple[list[int], int]:
        """CLIP's framing: ``[start] + ids[:text_ctx - 2] + [end]``, zero-padded to ``text_ctx``.

        Returns:
          (tokens, length): ``text_ctx`` ids and the framed length (ids + 2, at
          most ``text_ctx``); the text encoder reads position ``length - 1``.
        """
        if text_ctx < 2:
            raise ValueError(f"text_ctx must be at least 2 (start and end tokens), got {text_ctx}")
        framed = [self.start_token] + [int(i) for i in ids][: text_ctx - 2] + [self.end_token]
        return framed + [0] * (text_ctx - len(framed)), len(framed)

    def tokenize_batch(self, captions: Iterable[str], text_ctx: int) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (tokens int32 [B, text_ctx], lens int32 [B]) for ``models.clip.TextEncoder``."""
        rows = [self.padded_tokens_and_len(self.encode(c), text_ctx) for c in captions]
        tokens = np.array([r[0] for r in rows], np.int32).reshape(-1, text_ctx)
        return tokens, np.array([r[1] for r in rows], np.int32)


def load_clip_tokenizer(bpe_path: str | os.PathLike) -> ClipTokenizer:
    """CLIP's tokenizer from ``bpe_simple_vocab_16e6.txt.gz`` (plain text accepted).

    Raises:
      FileNotFoundError: naming the file and where it comes from.
      ValueError: a file with too few merge lines.
    """
    path = os.fspath(bpe_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"missing CLIP vocabulary {path}: glide-text2im ships it as "
            "glide_text2im/tokenizer/bpe_simple_vocab_16e6.txt.gz (OpenAI CLIP as clip/bpe_simple_vocab_16e6.txt.gz)")
    lines = read_text(path).split("\n")[1 : N_MERGES + 1]  # the first line is a version header
    merges = [tuple(line.split()) for line in lines]
    bad = [m for m in merges if len(m) != 2]
    if len(merges) != N_MERGES or bad:
        raise ValueError(f"{path}: expected {N_MERGES} merge pairs after the header, got {len(merges)} "
                         f"({len(bad)} malformed, e.g. {bad[:3]})")
    return ClipTokenizer(merges)
