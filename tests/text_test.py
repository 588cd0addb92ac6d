"""Tests for diffusion_jax.text: GLIDE's BPE tokenizer (on a small GPT-2-format vocabulary
built here) and the byte-level fallback."""

import gzip
import itertools
import json
import os
import shutil
import tempfile

import numpy as np
import regex
from absl.testing import absltest, parameterized

from diffusion_jax import text

PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
MERGES = [("a", "t"), ("c", "at"), ("Ġ", "cat"), ("h", "a"), ("Ġ", "ha"), ("t", "s"), ("'", "s"),
          ("e", "r"), ("Ġ", "a"), ("1", "2"), ("Ã", "©")]


def gpt2_byte_chars():
    """GPT-2's byte -> character table, in id order (written independently of the library)."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}, keep + rest


def reference_encode(s, encoder, merges):
    """GLIDE's Encoder.encode (lower-case, regex split, merge-list BPE), for comparison."""
    chars, _ = gpt2_byte_chars()
    ranks = {m: i for i, m in enumerate(merges)}
    out = []
    for piece in PAT.findall(s.lower()):
        word = [chars[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(itertools.pairwise(word))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            first, second = word[i], word[i + 1]
            new, j = [], 0
            while j < len(word):  # merge every occurrence, left to right
                if j < len(word) - 1 and word[j] == first and word[j + 1] == second:
                    new.append(first + second)
                    j += 2
                else:
                    new.append(word[j])
                    j += 1
            word = new
        out += [encoder[w] for w in word]
    return out


def write_vocab(directory, gz=False, merges=MERGES):
    chars, order = gpt2_byte_chars()
    encoder = {chars[b]: i for i, b in enumerate(order)}
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    bpe = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    ext = ".gz" if gz else ""
    enc_path, bpe_path = os.path.join(directory, "encoder.json" + ext), os.path.join(directory, "vocab.bpe" + ext)
    opener = gzip.open if gz else open
    with opener(enc_path, "wt", encoding="utf-8") as f:
        json.dump(encoder, f)
    with opener(bpe_path, "wt", encoding="utf-8") as f:
        f.write(bpe)
    return enc_path, bpe_path, encoder


SAMPLES = [
    "A cat", "a CAT hat", "The cat's hat", "cats and hats!!", "  leading and trailing  ", "tab\tand\nnewline",
    "Café au lait 12 123", "ünïcödé 🙂 emoji", "it's, they're, we'll, I'd, I'm, don't", "<|endoftext|> inside",
    "", "     ", "x" * 50, "ÉCOLE école",
]


class GlideTokenizerTest(parameterized.TestCase):

    def tempdir(self):
        # absltest's create_tempdir needs parsed absl flags, which pytest does not provide.
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, ignore_errors=True)
        return d

    def setUp(self):
        super().setUp()
        self.dir = self.tempdir()
        enc_path, bpe_path, self.encoder = write_vocab(self.dir)
        self.tok = text.load_glide_tokenizer(enc_path, bpe_path)

    def test_vocab_size_and_end_token(self):
        self.assertEqual(self.tok.n_vocab, len(self.encoder))
        self.assertEqual(self.tok.end_token, len(self.encoder) - 1)
        self.assertEqual(self.tok.end_token, self.encoder["<|endoftext|>"])

    def test_known_ids(self):
        # "a cat" -> ["a", "Ġcat"]: byte "a" is id 64 (the 65th printable byte), "Ġcat" the third merge.
        self.assertEqual(self.tok.encode("A cat"), [64, 258])
        self.assertEqual(self.tok.encode("cat's"), [257, 262])

    @parameterized.parameters(*SAMPLES)
    def test_matches_reference_bpe(self, s):
        self.assertEqual(self.tok.encode(s), reference_encode(s, self.encoder, MERGES))

    @parameterized.parameters(*SAMPLES)
    def test_round_trip_is_lower_cased(self, s):
        self.assertEqual(self.tok.decode(self.tok.encode(s)), s.lower())

    def test_lower_cases(self):
        self.assertEqual(self.tok.encode("A CAT HAT"), self.tok.encode("a cat hat"))

    def test_special_token_text_is_ordinary(self):
        ids = self.tok.encode("<|endoftext|>")
        self.assertNotIn(self.tok.end_token, ids)
        self.assertEqual(self.tok.decode([self.tok.end_token]), "<|endoftext|>")

    def test_decode_replaces_invalid_utf8(self):
        e9 = self.encoder[gpt2_byte_chars()[0][0xE9]]  # a lone continuation-less lead byte
        self.assertEqual(self.tok.decode([e9]), "\ufffd")

    def test_padded_tokens_and_mask(self):
        ids = self.tok.encode("a cat hat")
        tokens, mask = self.tok.padded_tokens_and_mask(ids, 6)
        self.assertEqual(tokens, ids + [self.tok.end_token] * (6 - len(ids)))
        self.assertEqual(mask, [True] * len(ids) + [False] * (6 - len(ids)))
        tokens, mask = self.tok.padded_tokens_and_mask(list(range(10)), 4)
        self.assertEqual((tokens, mask), ([0, 1, 2, 3], [True] * 4))
        tokens, mask = self.tok.padded_tokens_and_mask([], 3)
        self.assertEqual((tokens, mask), ([self.tok.end_token] * 3, [False] * 3))
        with self.assertRaises(ValueError):
            self.tok.padded_tokens_and_mask(ids, 0)

    def test_tokenize_batch(self):
        tokens, mask = self.tok.tokenize_batch(["a cat", "", "hat " * 20], 5)
        self.assertEqual((tokens.shape, tokens.dtype, mask.dtype), ((3, 5), np.int32, np.bool_))
        np.testing.assert_array_equal(tokens[1], [self.tok.end_token] * 5)
        self.assertFalse(mask[1].any())
        self.assertTrue(mask[2].all())
        np.testing.assert_array_equal(tokens[0, :2], self.tok.encode("a cat"))

    def test_gzip_files(self):
        d = self.tempdir()
        enc_gz, bpe_gz, _ = write_vocab(d, gz=True)
        tok = text.load_glide_tokenizer(enc_gz, bpe_gz)
        for s in SAMPLES:
            self.assertEqual(tok.encode(s), self.tok.encode(s))

    def test_missing_files(self):
        with self.assertRaises(FileNotFoundError) as cm:
            text.load_glide_tokenizer(os.path.join(self.dir, "nope.json"), os.path.join(self.dir, "vocab.bpe"))
        msg = str(cm.exception)
        self.assertIn("encoder.json", msg)
        self.assertIn("nope.json", msg)
        self.assertIn("glide_text2im/tokenizer/encoder.json.gz", msg)
        self.assertNotIn("vocab.bpe (", msg)  # that one exists

    def test_inconsistent_vocabulary(self):
        d = self.tempdir()
        enc_path, bpe_path, encoder = write_vocab(d)
        encoder["at"], encoder["cat"] = encoder["cat"], encoder["at"]
        with open(enc_path, "w") as f:
            json.dump(encoder, f)
        with self.assertRaisesRegex(ValueError, "does not match vocab.bpe"):
            text.load_glide_tokenizer(enc_path, bpe_path)


# glide-text2im's ids for the fixture captions (tests/data/parity/glide inputs/tokens), checked
# only when GLIDE's own vocabulary files are available locally.
_GLIDE_DIR = os.environ.get("GLIDE_TOKENIZER_DIR", "")
_CAPTIONS = {
    "an oil painting of a corgi": [272, 3056, 12036, 286, 257, 1162, 12397],
    "a cat wearing a tiny hat": [64, 3797, 5762, 257, 7009, 6877],
}


class RealVocabularyTest(absltest.TestCase):

    @absltest.skipUnless(os.path.isdir(_GLIDE_DIR), "set GLIDE_TOKENIZER_DIR to glide_text2im/tokenizer")
    def test_fixture_captions(self):
        tok = text.load_glide_tokenizer(os.path.join(_GLIDE_DIR, "encoder.json.gz"),
                                        os.path.join(_GLIDE_DIR, "vocab.bpe.gz"))
        self.assertEqual((tok.n_vocab, tok.end_token), (50257, 50256))
        for caption, ids in _CAPTIONS.items():
            self.assertEqual(tok.encode(caption), ids)
        self.assertEqual(tok.encode("A Red Cube on top of a blue sphere")[:8],
                         [64, 2266, 23441, 319, 1353, 286, 257, 4171])


class ByteTokenizerTest(absltest.TestCase):

    def test_interface(self):
        tok = text.ByteTokenizer()
        self.assertEqual((tok.n_vocab, tok.end_token), (257, 256))
        self.assertEqual(tok.encode("7 é"), [55, 32, 0xC3, 0xA9])
        self.assertEqual(tok.decode(tok.encode("seven é")), "seven é")
        tokens, mask = tok.padded_tokens_and_mask(tok.encode("seven"), 8)
        self.assertEqual(tokens, [115, 101, 118, 101, 110, 256, 256, 256])
        self.assertEqual(mask, [True] * 5 + [False] * 3)
        self.assertEqual(tok.decode(tokens), "seven")
        self.assertEqual(text.ByteTokenizer(lower=True).encode("AB"), [97, 98])
        t, m = tok.tokenize_batch(["a digit 3", ""], 4)
        self.assertEqual(t.shape, (2, 4))
        self.assertFalse(m[1].any())


if __name__ == "__main__":
    absltest.main()
