"""Bigram language model: a table of next-character logits, trained, then checked against counting.

A bigram model predicts the next character from the current one alone, so all it can learn is a
V x V table: row a holds the logits of the character that follows a. We learn the table by
gradient descent, in the same skeleton as gpt.py (config, data, model, training loop, evaluation,
sampling), then count every adjacent pair of the training text, which gives the best table any
bigram model can have, and print both: gradient descent finds the counts.

The lesson comes first, in that order; the command-line machinery (reading the file, flags,
devices, one-line errors) comes last.

    python bigram.py           # trains on input.txt, then compares the table with the counts
    python bigram.py --help    # every flag, with its default
"""
import argparse
import dataclasses
import gc
import math
import numbers
import os
import sys
import time
import unicodedata

import torch
import torch.nn as nn
from torch.nn import functional as F

# Add-alpha smoothing of the counts: an unseen pair gets a little probability instead of zero, which
# would make a validation text that contains it infinitely surprising. 0.1 gave input.txt the lowest
# validation NLL of the values tried (README).
ALPHA = 0.1
NATS_PER_BIT = math.log(2)  # a loss in bits per character is the loss in nats / ln 2


# ---- config ----
@dataclasses.dataclass
class TrainConfig:
    # Defaults chosen by measuring on input.txt (README). A bigram needs only pair statistics, so big
    # batches and big steps suit it, with the learning rate decaying to 0 so that the noisy steps settle.
    input: str = dataclasses.field(default="input.txt", metadata={"help": "training text, UTF-8"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    seed: int = dataclasses.field(default=1337, metadata={"help": "random seed"})
    max_iters: int = dataclasses.field(default=250, metadata={"help": "training steps"})
    eval_interval: int = dataclasses.field(default=50, metadata={"help": "steps between evaluations"})
    eval_iters: int = dataclasses.field(default=10, metadata={"help": "batches per evaluation"})
    batch_size: int = dataclasses.field(default=128, metadata={"help": "windows per batch"})
    block_size: int = dataclasses.field(default=64, metadata={"help": "characters per window"})
    learning_rate: float = dataclasses.field(default=0.3, metadata={"help": "peak AdamW learning rate"})
    max_new_tokens: int = dataclasses.field(default=500, metadata={"help": "characters to sample"})

    def problem(self):
        """None when the settings make sense, else a one-line message."""
        for name in ("max_iters", "eval_interval", "eval_iters", "batch_size", "block_size"):
            if getattr(self, name) < 1:
                return f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
        if not 0 < self.learning_rate < math.inf:
            return f"--learning-rate must be a positive number, got {self.learning_rate}"
        if not 0 <= self.seed < 2**63:  # torch takes 64-bit seeds
            return f"--seed must be from 0 to 2**63 - 1, got {self.seed}"
        if self.max_new_tokens < 0:
            return f"--max-new-tokens must be 0 or more, got {self.max_new_tokens}"
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            return f"--device must be auto, cpu, cuda or mps, got {self.device!r}"
        return None


# ---- data ----
def encode(text, chars):
    """Text -> list of ids; a character's id is its position in the sorted vocabulary chars."""
    stoi = {ch: i for i, ch in enumerate(chars)}
    return [stoi[ch] for ch in text]


def decode(ids, chars):
    """List of ids (or a 1-D tensor) -> text."""
    return "".join(chars[i] for i in checked_ids(ids, len(chars)))


def split_data(data, block_size, path):
    """First 90 % for training, last 10 % for validation; each must hold one (x, y) window."""
    if len(data) < 10 * block_size + 1:  # the validation split has ceil(n / 10) characters
        raise ValueError(f"{path}: too short (length {len(data)}): --block-size {block_size} needs at least "
                         f"{10 * block_size + 1} characters, so that the 10% validation split holds one window")
    cut = len(data) * 9 // 10
    return data[:cut], data[cut:]


def get_batch(data, batch_size, block_size, device):
    """batch_size random windows: inputs x, and targets y that are x shifted one character on."""
    starts = torch.randint(len(data) - block_size, (batch_size, 1))  # (B, 1)
    positions = starts + torch.arange(block_size)  # (B, T)
    x, y = data[positions], data[positions + 1]  # (B, T), (B, T)
    return x.to(device), y.to(device)


# ---- model ----
class BigramLanguageModel(nn.Module):
    """Row a of a V x V table holds the logits of the character that follows character a."""

    def __init__(self, vocab_size):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)
        nn.init.zeros_(self.token_embedding_table.weight)  # start uniform: first loss is exactly ln V

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)  # (B, T, V)
        if targets is None:
            return logits, None
        B, T, V = logits.shape
        loss = F.cross_entropy(logits.view(B * T, V), targets.view(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Extend idx (B, T) by max_new_tokens characters, each drawn from the last one's row."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -1:])  # (B, 1, V): a bigram looks at the last character only
            probs = F.softmax(logits[:, -1, :], dim=-1)  # (B, V)
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx


@torch.no_grad()
def estimate_loss(model, splits, cfg, device):
    """Mean loss over cfg.eval_iters random batches of each split, in eval mode."""
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = [model(*get_batch(data, cfg.batch_size, cfg.block_size, device))[1].item()
                  for _ in range(cfg.eval_iters)]
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


# ---- the count-based bigram: the optimum, counted instead of learned ----
def pair_counts(data, vocab_size):
    """(V, V) table: counts[a, b] = how often character b follows character a in data."""
    pairs = data[:-1] * vocab_size + data[1:]  # (N - 1,) one number per adjacent pair
    return torch.bincount(pairs, minlength=vocab_size**2).view(vocab_size, vocab_size).float()


def count_log_probs(counts, alpha=ALPHA):
    """log P(b | a) = log (counts[a, b] + alpha) / (counts[a].sum() + alpha V)."""
    smoothed = counts + alpha  # (V, V)
    return (smoothed / smoothed.sum(dim=1, keepdim=True)).log()  # (V, V)


def nll(log_probs, counts):
    """Mean negative log-likelihood, in nats, of every pair that counts holds: exact, no sampling."""
    terms = torch.where(counts > 0, counts * log_probs, 0.0)  # (V, V); 0 log 0 = 0, not nan
    return -terms.sum().item() / counts.sum().item()


def compare_with_counts(table, train_data, val_data):
    """{name: (train NLL, val NLL)} in nats for the learned table and the count optimum, each judged
    on every pair of each split, from its pair counts: exact, no sampling."""
    V = table.size(0)
    train_counts, val_counts = pair_counts(train_data, V), pair_counts(val_data, V)
    learned = table.detach().cpu().log_softmax(dim=1)  # (V, V): row a is P(next | a)
    counted = count_log_probs(train_counts)  # (V, V)
    return {name: (nll(log_probs, train_counts), nll(log_probs, val_counts))
            for name, log_probs in (("trained table", learned), (f"count optimum (alpha {ALPHA})", counted))}


# ---- training ----
def train(model, train_data, val_data, cfg, device):
    """AdamW, lr decaying linearly to 0; logs every cfg.eval_interval steps; returns the training seconds."""
    # No weight decay: it would pull the table toward uniform, away from the counts it should find.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    tokens_per_step = cfg.batch_size * cfg.block_size
    train_seconds, last_log, last_step = 0.0, time.perf_counter(), 0
    for step in range(cfg.max_iters + 1):
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            line = f"step {step:5d}"
            if step > 0:
                line += f" | loss {loss.item():.4f} | lr {lr:.2e}"  # .item() waits for the GPU: honest clock
                seconds = time.perf_counter() - last_log
                train_seconds += seconds
                ms = 1000 * seconds / (step - last_step)
                line += f" | {ms:6.2f} ms/step | {tokens_per_step / ms / 1000:4.1f}M tok/s"
            losses = estimate_loss(model, {"train": train_data, "val": val_data}, cfg, device)
            for name, value in losses.items():
                line += f" | {name} {value:.4f} nats {value / NATS_PER_BIT:.3f} bits/char"
            print(line, flush=True)
            last_log, last_step = time.perf_counter(), step
        if step == cfg.max_iters:
            return train_seconds
        lr = cfg.learning_rate * (1 - step / cfg.max_iters)  # decay to 0 lets the noisy steps settle
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, device)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# ---- the script: train, judge against the counts, sample ----
def main(argv=None):
    gc.freeze()  # torch's many objects live until exit: exempt them from garbage collection
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    add_flags(parser, TrainConfig())
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    problem = cfg.problem()
    if problem:
        parser.error(problem)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    # A V x V table is too small to share out: more threads save little on an idle machine, and cost
    # many times over as soon as another program holds a core.
    torch.set_num_threads(1)

    text = read_text(cfg.input)
    chars = sorted(set(text))  # the vocabulary: every distinct character
    check_memory(cfg, len(chars), device)  # before allocating: a step too big is one line, not a crash
    data = torch.tensor(encode(text, chars), dtype=torch.long)  # (N,)
    train_data, val_data = split_data(data, cfg.block_size, cfg.input)
    print(f"{cfg.input}: {len(text):,} characters, vocabulary {len(chars)}, "
          f"train {len(train_data):,} / val {len(val_data):,}, device {device}")

    model = BigramLanguageModel(len(chars)).to(device)
    seconds = train(model, train_data, val_data, cfg, device)
    print(f"trained {cfg.max_iters} steps in {seconds:.2f} s")

    results = compare_with_counts(model.token_embedding_table.weight, train_data, val_data)
    print(f"{'NLL of every pair':<28}{'train':<26}val")
    for name, (t, v) in results.items():
        print(f"{name:<28}{t:.4f} nats {t / NATS_PER_BIT:.3f} bits    {v:.4f} nats {v / NATS_PER_BIT:.3f} bits")
    (_, learned_val), (_, counted_val) = results.values()
    print(f"gradient descent ends {learned_val - counted_val:+.4f} nats from the count optimum on validation")

    if cfg.max_new_tokens:
        print(f"---- {cfg.max_new_tokens} characters sampled from the trained table ----")
        model.eval()
        start = torch.zeros((1, 1), dtype=torch.long, device=device)  # id 0, the smallest character: "\n" here
        print(decode(model.generate(start, cfg.max_new_tokens)[0, 1:].tolist(), chars))


# ==================================================================================================
# Machinery: reading the text, flags and devices (shared with gpt.py word for word), checks, one-line
# errors. A reader may skip it.
# ==================================================================================================

def read_text(path):
    """The training text, or a one-line ValueError that names the problem and the fix. A UTF-8
    byte-order mark at the start (some editors write one) is not text: utf-8-sig drops it. NFC: é is one
    character, as in gpt.py, never e and a combining accent."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = unicodedata.normalize("NFC", f.read())
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


def add_flags(parser, config):
    """One --dashed-name flag per dataclass field that has help, typed and defaulted from the field."""
    for field in dataclasses.fields(config):
        if "help" not in field.metadata:
            continue  # derived fields get no flag
        default = getattr(config, field.name)
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata["help"] + " (default: %(default)r)"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def pick_device(name):
    """'auto' means CUDA when there is one, else CPU; MPS only when asked for."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available here; use --device cpu")
    return name


def checked_ids(ids, vocab_size):
    """ids as a list of ints in 0..vocab_size - 1; a 1-D tensor or array is taken as its list. Anything
    else is a ValueError that says which id is wrong and what the vocabulary is."""
    if hasattr(ids, "tolist"):  # a tensor or an array
        if ids.ndim != 1:
            raise ValueError(f"ids must be a list of token ids or a 1-D tensor, got shape "
                             f"{tuple(ids.shape)}: decode each row on its own")
        ids = ids.tolist()
    try:
        ids = list(ids)
    except TypeError:
        raise ValueError(f"ids must be a list of token ids or a 1-D tensor, got {ids!r}") from None
    known = f"ids are 0..{vocab_size - 1} (a vocabulary of {vocab_size})"
    for i in ids:
        if type(i) is not int and (isinstance(i, bool) or not isinstance(i, numbers.Integral)):
            raise ValueError(f"token id {i!r} is not an integer: {known}")
        if not 0 <= i < vocab_size:
            raise ValueError(f"unknown token id {i!r}: {known}")
    return ids


def check_memory(cfg, vocab_size, device):
    """Refuse a step that cannot fit in memory. It holds the (B, T, V) logits about four times over
    (the logits, their log-softmax and both gradients, in float32) and three (B, T) int64 tensors."""
    need = cfg.batch_size * cfg.block_size * (4 * 4 * vocab_size + 3 * 8)
    if device == "cuda":
        have, where = torch.cuda.mem_get_info()[0], "the GPU has free"
    else:
        try:
            have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): not checked
            return
    if need > have:
        raise ValueError(f"--batch-size {cfg.batch_size} with --block-size {cfg.block_size} needs about "
                         f"{need / 2**30:,.1f} GiB for one step, more than the {have / 2**30:,.1f} GiB {where}: "
                         "lower --batch-size or --block-size")


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


if __name__ == "__main__":
    run_command_line(main)
