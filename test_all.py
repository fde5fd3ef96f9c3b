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


# ---- bigram.py ----
# The bigram baseline: its counted optimum, training toward it, sampling, and the script's errors.
import math  # noqa: E402
import random  # noqa: E402

import bigram  # noqa: E402  (imports torch behind its numpy-warning filter)
import torch  # noqa: E402

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
