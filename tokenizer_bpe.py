"""
A byte-level BPE tokenizer from scratch, the kind GPT-2 and GPT-4 use.

Text becomes UTF-8 bytes, ids 0..255. Training repeatedly finds the most frequent adjacent
pair of ids and gives it a new id (merge i gets id 256 + i). Encoding replays the merges in
the order they were learned; decoding joins the bytes back. A regex first splits the text into
chunks (words, numbers, punctuation, whitespace) so that no merge crosses a chunk boundary.

    python tokenizer_bpe.py                       # train vocab 512 on input.txt, print a benchmark
    python tokenizer_bpe.py --vocab-size 4096 --pattern gpt2 --out out/bpe_gpt2.json
"""
import argparse
import heapq
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict

import regex

# ---------------------------------------------------------------------------------------------
# Split patterns: the exact strings tiktoken ships (possessive quantifiers, so no backtracking)
# ---------------------------------------------------------------------------------------------

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN, "none": None}
ENDOFTEXT = "<|endoftext|>"
FORMAT_VERSION = 1

# tiktoken's Rust regex knows Unicode 16.0; the `regex` module knows a newer version. Code points
# assigned since (these ranges, hex) are letters or digits for `regex` but unassigned for
# tiktoken, so chunks would split differently around them. Before splitting we replace them with
# U+FFFF, a code point that is unassigned in every version: both engines then agree.
NEWER_THAN_UNICODE_16 = """
558 58B-58C 5C8-5C9 88F B53-B54 C5C CDC 1ACF-1AF0 208F 209D-209F 20C1-20C4 2B96 2E60-2E63
A7CE-A7CF A7D2 A7D4 A7DD A7E2 A7F1 AB6C-AB6D FBC3-FBD2 FD90-FD91 FDC8-FDCE 107BB-107BF
10940-10959 10EC5-10EC7 10EC9-10EEE 10EF0-10EFB 11B0A 11B60-11B67 11DB0-11DDB 11DE0-11DE9
11DF0-11DF1 1246F 12475-1247F 12550-12686 16EA0-16EB8 16EBB-16ED3 16FF2-16FF6 187F8-187FF
18CD6-18CDA 18D09-18D20 18D80-18DF2 18E00-19191 191A0-191D2 1B123-1B128 1B168 1CCFA-1CCFC
1CEBA-1CED0 1CED2-1CED4 1CEDD-1CEFD 1D127-1D128 1D1EB-1D1FF 1D250-1D281 1D6A6 1DB00-1DB1C
1DF1F-1DF24 1DF2B-1DF81 1DF90-1DF96 1DFCD-1DFFF 1E6C0-1E6DE 1E6E0-1E6F5 1E6FE-1E6FF 1F1AE
1F6D8-1F6D9 1F777-1F77A 1F7DA-1F7DB 1F7F1-1F7FF 1F8D0-1F8D8 1FA54-1FA57 1FA8A-1FA8E 1FAC8
1FACC-1FACD 1FADD 1FAEA-1FAEB 1FAEF 1FAF9-1FAFA 1FBFA 2B73A-2B73F 2B81E 2CEA2-2CEAD
323B0-33479 3D000-3FC3F"""
NEWER_CODE_POINTS = regex.compile("[" + "".join(
    "-".join("\\U%08x" % int(end, 16) for end in span.split("-"))
    for span in NEWER_THAN_UNICODE_16.split()) + "]")
UNICODE_16_LETTER = "\U0001e5d0"  # OL ONAL LETTER O, new in 16.0: a letter to any regex that is new enough


def ascii_twin(pattern):
    """On ASCII text \p{L} is [A-Za-z] and \p{N} is [0-9]: with those, the stdlib `re` engine
    splits ASCII text into the same chunks about 3x faster than `regex`."""
    inside = regex.sub(r"\[[^\]]*\]", lambda m: m[0].replace(r"\p{L}", "A-Za-z").replace(
        r"\p{N}", "0-9"), pattern)
    try:
        return re.compile(inside.replace(r"\p{L}", "[A-Za-z]").replace(r"\p{N}", "[0-9]"), re.ASCII)
    except re.error:  # Python < 3.11: no possessive quantifiers in `re`, so no twin
        return None


ASCII_TWINS = {pattern: ascii_twin(pattern) for pattern in (GPT4_PATTERN, GPT2_PATTERN)}


# ---------------------------------------------------------------------------------------------
# Pairs and merges
# ---------------------------------------------------------------------------------------------

def count_pairs(ids, counts=None):
    """Count adjacent pairs. Overlaps count the textbook way: 'aaa' holds the pair (a, a) twice."""
    counts = Counter() if counts is None else counts
    counts.update(zip(ids, ids[1:]))
    return counts


def merge(ids, pair, new_id):
    """Replace each occurrence of `pair` by `new_id`, left to right, never overlapping: aaa -> Xa."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def best_pair(counts):
    """The next merge: the highest count, ties broken by the smallest pair (left_id, right_id)."""
    return min(counts, key=lambda pair: (-counts[pair], pair))


class BPETokenizer:
    def __init__(self, pattern="gpt4", special_tokens=(ENDOFTEXT,)):
        self.pattern = PATTERNS.get(pattern, pattern) if isinstance(pattern, str) else pattern
        if self.pattern is not None and not isinstance(self.pattern, str):
            raise ValueError(f"pattern must be 'gpt4', 'gpt2', None or a regex string, got {pattern!r}")
        try:
            self._split_regex = regex.compile(self.pattern) if self.pattern is not None else None
        except regex.error as err:
            raise ValueError(f"invalid split pattern {self.pattern!r}: {err}") from None
        self.byte_order = list(range(256))  # id -> byte value of the 256 single-byte tokens
        self.merges = {}  # (left_id, right_id) -> new_id, in merge order
        self._set_special_tokens(special_tokens)

    # ---- the derived tables: everything else follows from byte_order, merges, specials ----

    def _set_special_tokens(self, names, first_id=None):
        first_id = 256 + len(self.merges) if first_id is None else first_id
        self.special_tokens = {name: first_id + i for i, name in enumerate(names)}
        self._rebuild()

    def _rebuild(self):
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
        ascii_twin = ASCII_TWINS.get(self.pattern)
        if ascii_twin and text.isascii():
            chunks = ascii_twin.findall(text)
        elif not text.isascii() and NEWER_CODE_POINTS.search(text):
            masked = NEWER_CODE_POINTS.sub("\uffff", text)  # same length, so the spans carry over
            chunks = [text[m.start():m.end()] for m in self._split_regex.finditer(masked)]
        else:
            chunks = self._split_regex.findall(text)
        if sum(map(len, chunks)) != len(text):
            raise ValueError(f"split pattern {self.pattern!r} skips some of the text: "
                             "it must match every character (end it with an alternative like |\\s)")
        return chunks

    # ---- training: the definition, then the same result fast ----

    def _check_training(self, text, vocab_size):
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"vocab_size must be an integer >= 257 (256 bytes + at least one "
                             f"merge), got {vocab_size!r}")
        if not isinstance(text, str) or not text:
            raise ValueError("cannot train on empty text: give some text to learn merges from")
        self.byte_order, self.merges = list(range(256)), {}
        return vocab_size - 256

    def _finish_training(self, merges, wanted, vocab_size):
        self.merges = merges
        if len(merges) < wanted:
            print(f"training stopped early at vocab size {256 + len(merges)} of {vocab_size}: "
                  "no pair occurs twice any more (give more text or ask for a smaller vocab)")
        self._set_special_tokens(list(self.special_tokens))

    def train_naive(self, text, vocab_size):
        """The textbook algorithm: count all pairs, merge the most frequent, repeat. Slow."""
        n_merges = self._check_training(text, vocab_size)
        chunks = [list(chunk.encode("utf-8")) for chunk in self.split(text)]
        merges = {}
        while len(merges) < n_merges:
            counts = Counter()
            for ids in chunks:
                count_pairs(ids, counts)
            if not counts or max(counts.values()) < 2:
                break
            pair, new_id = best_pair(counts), 256 + len(merges)
            chunks = [merge(ids, pair, new_id) for ids in chunks]
            merges[pair] = new_id
        self._finish_training(merges, n_merges, vocab_size)

    def train(self, text, vocab_size, verbose=False):
        """Same merges as train_naive, fast: after one pass over the text, each merge touches
        only the places where its pair occurs."""
        n_merges = self._check_training(text, vocab_size)
        # 1) Each distinct chunk once, weighted by how often it occurs. All chunks sit in one
        #    list of ids, linked by nxt/prv (-1 ends a chunk) so a merge is O(1) in place.
        ids, weight, nxt, prv = [], [], [], []
        pair_counts, where = defaultdict(int), defaultdict(list)  # where: pair -> positions
        for chunk, count in Counter(self.split(text)).items():
            chunk_ids = chunk.encode("utf-8")
            start, end = len(ids), len(ids) + len(chunk_ids)
            ids += chunk_ids
            weight += [count] * len(chunk_ids)
            nxt += range(start + 1, end + 1)
            prv += range(start - 1, end - 1)
            nxt[-1] = prv[start] = -1
            # 2) Count every pair once, weighted, and remember where it starts.
            for p, pair in enumerate(zip(chunk_ids, chunk_ids[1:]), start):
                pair_counts[pair] += count
                where[pair].append(p)
        # 3) A heap keyed (-count, pair) pops the best pair. Entries go stale as counts change:
        #    every increase pushes a fresh entry; a stale entry is re-pushed when it surfaces.
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)
        merges = {}
        while len(merges) < n_merges and heap:
            neg_count, pair = heap[0]
            count = pair_counts.get(pair, 0)
            if count != -neg_count:
                heapq.heapreplace(heap, (-count, pair)) if count else heapq.heappop(heap)
                continue
            if count < 2:
                break
            new_id = merges[pair] = 256 + len(merges)
            # 4) Merge in place and change only the neighbours' counts:
            #    in x a b y, the pairs (x,a) (a,b) (b,y) become (x,new) (new,y).
            a, b = pair
            positions = where.pop(pair)
            if a == b:  # runs like aaa overlap: merge left to right, as merge() does
                positions = sorted(positions)
            delta = defaultdict(int)
            for p in positions:
                q = nxt[p]
                if ids[p] != a or q < 0 or ids[q] != b:
                    continue  # stale: an earlier merge changed this place
                freq = weight[p]
                delta[pair] -= freq
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
            for changed, d in delta.items():
                if d:
                    count = pair_counts[changed] + d
                    if count:
                        pair_counts[changed] = count
                    else:
                        del pair_counts[changed]
                    if d > 0 and count > 1:  # a pair seen once can never be the best
                        heapq.heappush(heap, (-count, changed))
            if verbose and (len(merges) % max(1, n_merges // 10) == 0 or len(merges) == n_merges):
                token = (self._token_bytes(merges, pair)).decode("utf-8", "replace")
                print(f"merge {len(merges):5d}/{n_merges}: {token!r} (count {-neg_count})")
        self._finish_training(merges, n_merges, vocab_size)

    def _token_bytes(self, merges, pair):
        """Bytes of the token made by `pair` (vocab is not rebuilt during training)."""
        inverse = {new_id: p for p, new_id in merges.items()}
        def expand(i):
            return bytes([i]) if i < 256 else expand(inverse[i][0]) + expand(inverse[i][1])
        return expand(pair[0]) + expand(pair[1])

    # ---- encoding and decoding ----

    def _merge_chunk(self, ids):
        """Apply the merges to one chunk: the earliest-learned pair first, leftmost first."""
        merges = self.merges
        heap = [(merges[pair], i) for i, pair in enumerate(zip(ids, ids[1:])) if pair in merges]
        if not heap:
            return ids
        heapq.heapify(heap)
        # ids becomes a linked list: merged-away slots hold None, nxt/prv skip over them.
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        while heap:
            new_id, i = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] is None or j >= n or merges.get((ids[i], ids[j])) != new_id:
                continue  # stale: this pair was changed by an earlier merge
            ids[i], ids[j] = new_id, None
            nxt[i] = k = nxt[j]
            if k < n:
                prv[k] = i
                right = merges.get((new_id, ids[k]))
                if right is not None:
                    heapq.heappush(heap, (right, i))
            h = prv[i]
            if h >= 0:
                left = merges.get((ids[h], new_id))
                if left is not None:
                    heapq.heappush(heap, (left, h))
        return [x for x in ids if x is not None]

    def encode_ordinary(self, text):
        """Encode text, treating special-token strings as plain text."""
        cache, ids = {}, []  # a text repeats chunks a lot: merge each distinct chunk once
        for chunk in self.split(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = cache[chunk] = self._merge_chunk(
                    list(chunk.encode("utf-8").translate(self._byte_to_id)))
            ids += chunk_ids
        return ids

    def encode(self, text, allowed_special="none_raise"):
        """Text -> ids. allowed_special: 'all', 'none' (plain text), 'none_raise' (the default:
        error if the text holds a special token), or a set of the special tokens to allow."""
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        elif allowed_special in ("none", "none_raise"):
            allowed = set()
        elif isinstance(allowed_special, str) or not set(allowed_special) <= set(self.special_tokens):
            raise ValueError(f"allowed_special must be 'all', 'none', 'none_raise' or a set of "
                             f"this tokenizer's special tokens {sorted(self.special_tokens)}, "
                             f"got {allowed_special!r}")
        else:
            allowed = set(allowed_special)
        if allowed_special != "none":
            for name in self.special_tokens:
                if name not in allowed and name in text:
                    raise ValueError(f"text contains the special token {name!r}: pass "
                                     f"allowed_special={{{name!r}}} (or 'all') to encode it as one "
                                     "token, or allowed_special='none' to encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        # Longest first, so that of two overlapping special tokens the longer one wins.
        names = sorted(allowed, key=len, reverse=True)
        parts = regex.split("(" + "|".join(map(regex.escape, names)) + ")", text)
        ids = []
        for i, part in enumerate(parts):
            ids += [self.special_tokens[part]] if i % 2 else self.encode_ordinary(part)
        return ids

    def decode_bytes(self, ids):
        try:
            return b"".join(map(self.vocab.__getitem__, ids))
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in self.vocab)
            raise ValueError(f"unknown token id {bad!r}: this tokenizer has ids 0.."
                             f"{255 + len(self.merges)} and specials "
                             f"{sorted(self.special_tokens.values())}") from None

    def decode(self, ids):
        """Ids -> text. A token may hold half a character: invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- save and load: one JSON file; the vocabulary is rebuilt from the merges ----

    def save(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        state = {"format": "tokenizer_bpe", "version": FORMAT_VERSION, "pattern": self.pattern,
                 "byte_order": self.byte_order, "merges": [list(pair) for pair in self.merges],
                 "special_tokens": self.special_tokens}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f)

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a tokenizer file (corrupt or truncated JSON: {err}); "
                             "save it again with BPETokenizer.save") from None
        if not isinstance(state, dict) or state.get("format") != "tokenizer_bpe":
            raise ValueError(f"{path} is not a tokenizer_bpe file; save one with BPETokenizer.save")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {state.get('version')!r}, this code reads "
                             f"version {FORMAT_VERSION}: retrain with python tokenizer_bpe.py")
        try:
            tok = cls(pattern=state["pattern"], special_tokens=())
            merges = [tuple(pair) for pair in state["merges"]]
            tok._install(state["byte_order"], merges, state["special_tokens"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); "
                             "save it again with BPETokenizer.save") from None
        return tok

    def _install(self, byte_order, merges, special_tokens):
        """Check and set a tokenizer's state; merge i must combine ids that exist before it."""
        if sorted(byte_order) != list(range(256)):
            raise ValueError("byte_order must hold each of the 256 byte values once")
        for i, pair in enumerate(merges):
            if (len(pair) != 2 or not all(type(x) is int and 0 <= x < 256 + i for x in pair)):
                raise ValueError(f"merge {i} {pair!r} does not join two earlier ids")
        if len(set(merges)) != len(merges):
            raise ValueError("the same pair is merged twice")
        n_ids = 256 + len(merges)
        ids = list(special_tokens.values())
        if not all(type(i) is int and i >= n_ids for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"special token ids {sorted(ids)} must be distinct and >= {n_ids}, "
                             "after the merged tokens")
        self.byte_order = list(byte_order)
        self.merges = {pair: 256 + i for i, pair in enumerate(merges)}
        self.special_tokens = dict(special_tokens)
        self._rebuild()

    # ---- tiktoken, both ways ----

    def to_tiktoken(self, name="tokenizer_bpe"):
        """A tiktoken.Encoding whose ids equal ours on any text (tiktoken's Rust encoder is fast)."""
        import tiktoken
        check_regex_unicode()
        ranks = {}
        for i in range(256 + len(self.merges)):
            token = self.vocab[i]
            if token in ranks:  # checked here: tiktoken would panic, uncatchable, on bad ranks
                raise ValueError(f"ids {ranks[token]} and {i} are both {token!r}: tiktoken needs "
                                 "distinct byte strings, so this tokenizer cannot be exported")
            ranks[token] = i
        if sorted(self.byte_order) != list(range(256)):
            raise ValueError("some of the 256 single bytes have no id: cannot export to tiktoken")
        n_ids = len(ranks)
        for special, i in self.special_tokens.items():
            if i < n_ids or list(self.special_tokens.values()).count(i) > 1:
                raise ValueError(f"special token {special!r} has id {i}, which collides with "
                                 "another token: special ids must be distinct and after the merges")
        return tiktoken.Encoding(name=name, pat_str=self.pattern or r"[\s\S]+",
                                 mergeable_ranks=ranks, special_tokens=dict(self.special_tokens))

    @classmethod
    def from_tiktoken(cls, encoding):
        """Our tokenizer from tiktoken's ranks: same ids on any text, e.g. for cl100k_base.
        Rank r's token is the merge of the two parts that BPE with the ranks below r leaves."""
        check_regex_unicode()
        by_rank = sorted((rank, token) for token, rank in encoding._mergeable_ranks.items())
        if [rank for rank, _ in by_rank] != list(range(len(by_rank))) or not all(
                len(token) == 1 for _, token in by_rank[:256]):
            raise ValueError(f"{encoding.name}: ranks must be 0..N-1 with the 256 single bytes "
                             "first, as in byte-level BPE")
        tok = cls(pattern=encoding._pat_str, special_tokens=())
        tok._install([token[0] for _, token in by_rank[:256]], [], {})
        for rank, token in by_rank[256:]:
            parts = tok._merge_chunk(list(token.translate(tok._byte_to_id)))
            if len(parts) != 2:
                raise ValueError(f"{encoding.name}: token {rank} {token!r} is not the merge of "
                                 "two earlier tokens, so these ranks are not byte-level BPE")
            tok.merges[tuple(parts)] = rank
        tok._install(tok.byte_order, list(tok.merges), encoding._special_tokens)
        return tok


def check_regex_unicode():
    if not regex.fullmatch(r"\p{L}", UNICODE_16_LETTER):
        raise ValueError("the installed regex module predates Unicode 16.0, so it splits text "
                         "differently from tiktoken: pip install --upgrade regex")


# ---------------------------------------------------------------------------------------------
# The script: train, save, and print a benchmark
# ---------------------------------------------------------------------------------------------

def show(tok, ids):
    return ", ".join(repr(tok.decode([i])) for i in ids)


def run(args):
    try:
        with open(args.input, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{args.input} is not UTF-8 text ({err})") from None
    split_at = int(len(text) * 0.9)  # train on the first 90 %, measure compression on the rest
    train_text, held_out = text[:split_at], text[split_at:]
    tok = BPETokenizer(pattern=args.pattern)
    print(f"training on {len(train_text):,} characters of {args.input}, pattern {args.pattern}, "
          f"vocab size {args.vocab_size}")
    t0 = time.perf_counter()
    tok.train(train_text, args.vocab_size, verbose=True)
    train_s = time.perf_counter() - t0
    new_ids = list(tok.merges.values())
    print(f"train: {train_s:.3f} s for {len(new_ids)} merges")
    print(f"first merges: {show(tok, new_ids[:8])}")
    print(f"last merges:  {show(tok, new_ids[-8:])}")
    held_bytes = len(held_out.encode("utf-8"))
    print(f"held-out last 10 %: {held_bytes / len(tok.encode(held_out)):.3f} bytes per token")
    t0 = time.perf_counter()
    ids = tok.encode(text)
    python_s = time.perf_counter() - t0
    enc = tok.to_tiktoken()
    t0 = time.perf_counter()
    tiktoken_ids = enc.encode_ordinary(text)
    tiktoken_s = time.perf_counter() - t0
    print(f"encode all {len(text.encode('utf-8')):,} bytes: pure Python {python_s:.3f} s, "
          f"tiktoken {tiktoken_s:.3f} s, {len(ids):,} tokens, same ids: {ids == tiktoken_ids}")
    print(f"round trip decode(encode(text)) == text: {tok.decode(ids) == text}")
    tok.save(args.out)
    print(f"saved {args.out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer and benchmark it.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", default="input.txt", help="UTF-8 text to train on")
    parser.add_argument("--vocab-size", type=int, default=512, help="256 bytes + the merges")
    parser.add_argument("--pattern", choices=list(PATTERNS), default="gpt4",
                        help="how to split text into chunks before merging")
    parser.add_argument("--out", default="out/bpe.json", help="where to save the tokenizer")
    args = parser.parse_args(argv)
    if args.vocab_size < 257:
        parser.error(f"--vocab-size must be at least 257 (256 bytes + 1 merge), got {args.vocab_size}")
    if not os.path.isfile(args.input):
        parser.error(f"--input {args.input}: no such file")
    try:
        run(args)
    except ValueError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
