"""A GPT from scratch in one file: the model, its training and its generation, then the lab around them.

    python gpt.py                              # train on input.txt, save out/ckpt.pt, print a sample
    python gpt.py --sample --prompt "ROMEO:"   # sample from it (--help: every flag, with its default here)
    python gpt.py --evaluate val.txt           # out/ckpt.pt on any text: its loss, its surprises, its heads
    python gpt.py --input corpus/ --tokenizer bpe --out-dir pre    # pretrain on a corpus, then fine-tune on
    python gpt.py --init-from pre/ckpt.pt --input play.txt         # a play (--init-from gpt2: OpenAI's GPT-2)
    torchrun --standalone --nproc_per_node=2 gpt.py                 # data-parallel: 2 GPUs or 2 CPU processes

Three parts. Part I is the lesson: a reader who stops at its end has read everything that `python gpt.py`
does that teaches something; it calls the machinery by names that say what they do.
  Part I    The GPT (line 58). Config; data: text -> token ids -> batches; the model: attention as the
            formula, then with a cache and grouped-query heads, the block, the GPT and what modern models
            changed; generation; training: the schedule, AdamW and Muon, evaluation, the loop.
  Part II   Further lessons (line 802). The real GPT-2 in this model; FlashAttention-2 and the attention
            benchmark; experiments: loss curves, scaling laws, embeddings, ablations; looking inside: attention
            from the ground up, a checkpoint measured on any text, its heads; the data benchmark.
  Part III  Machinery (line 2311). What a user relies on and a learner may skip: token files, checkpoints
            never lost, the out-dir lock, signals and pipes, torchrun, the command line, main().
"""
import argparse
import csv
import dataclasses
import errno
import gc
import glob
import hashlib
import inspect
import io
import json
import math
import mmap
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, redirect_stdout, suppress

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ==============================================================================================
# Part I — the GPT
# ==============================================================================================

# ---- Config: the single source of every hyperparameter; each field is also a --flag ----------

def flag(default, help, valid=None, choices=None):
    """A config field and its --flag (add_flags, Part III): its help, and the values it takes."""
    return dataclasses.field(default=default, metadata={"help": help, "valid": valid, "choices": choices})


# What a numeric flag takes: (what to say, the test); nan fails every test.
AT_LEAST_1, COUNT = ("at least 1", lambda x: x >= 1), ("0 or more", lambda x: x >= 0)
POSITIVE, NOT_NEGATIVE = ("positive", lambda x: 0 < x < math.inf), ("a finite number >= 0", lambda x: 0 <= x < math.inf)
BELOW_1 = ("in [0, 1)", lambda x: 0 <= x < 1)
ATTENTIONS = ("sdpa", "math", "flash")  # pick_attention's names, and MLP_ACTIVATIONS's: the config comes first
MLP_CHOICES = ("gelu", "gelu_tanh", "relu2", "swiglu")


# The defaults per machine, chosen by measurement (README): a 2-core CPU gets a small model with Muon, RoPE,
# SwiGLU, an untied head and bf16 matmuls where native; a GPU the classic 6x6x384 model; gpt2 is GPT-2's recipe
# as it was.
PRESETS = {
    "gpt2": {},  # the dataclasses' defaults
    "cpu": dict(dtype="auto", optimizer="muon", muon_lr=0.01, mlp="swiglu", untied_head=True, rope=True, block_size=128,
                batch_size=16, min_lr_ratio=0.0, max_iters=1700),
    "gpu": dict(dtype="auto", n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                learning_rate=1e-3, max_iters=5000, eval_interval=500, eval_iters=50, warmup_iters=100),
}


@dataclasses.dataclass
class GPTConfig:
    """The model. The defaults are GPT-2's design at a small size; the modern options below each change one thing."""
    block_size: int = flag(64, "context length in tokens", AT_LEAST_1)
    n_layer: int = flag(2, "transformer blocks", AT_LEAST_1)
    n_head: int = flag(4, "query heads per attention layer", AT_LEAST_1)
    n_kv_head: int = flag(0, "key/value heads (grouped-query); 0 = n_head, 1 = multi-query", COUNT)
    n_embd: int = flag(128, "embedding width", AT_LEAST_1)
    dropout: float = flag(0.0, "dropout probability while training", BELOW_1)
    bias: bool = flag(True, "biases in Linear and LayerNorm layers, as GPT-2")
    attention: str = flag("sdpa", "sdpa (fused), math (the formula) or flash (FlashAttention-2)", choices=ATTENTIONS)
    rope: bool = flag(False, "rotary position embeddings, no position table")
    norm: str = flag("layernorm", "layernorm (GPT-2) or rmsnorm (no mean, no bias)", choices=("layernorm", "rmsnorm"))
    post_ln: bool = flag(False, "normalise after each residual add, as the 2017 transformer (default: before, pre-LN)")
    mlp: str = flag("gelu", "gelu, gelu_tanh (GPT-2's), relu2 (ReLU squared), swiglu (gated)", choices=MLP_CHOICES)
    qk_norm: bool = flag(False, "RMS-normalise queries and keys per head before their dot product")
    untied_head: bool = flag(False, "an output layer of its own instead of the token embedding table")
    zero_init: bool = flag(False, "output projections start at zero: each block starts as the identity")
    softcap: float = flag(0.0, "squash the logits into (-softcap, softcap) with tanh; 0 = off", NOT_NEGATIVE)
    residual: bool = flag(True, "residual connections (--no-residual: an ablation, to see a block fail without them)")
    vocab_size: int = 0  # derived from the tokenizer, so it has no flag

    def kv_heads(self):
        return self.n_kv_head or self.n_head


@dataclasses.dataclass
class TrainConfig:
    """The run: data, training, sampling, where files go. (The lab's flags: LabConfig, Part II.)"""
    input: str = flag("input.txt", "training text (UTF-8): a file, a directory (its *.txt, *.jsonl) or a quoted glob")
    out_dir: str = flag("out", "where ckpt.pt, log.csv and loss.png (and token files) are written and read")
    preset: str = flag("auto", "defaults: cpu, gpu, gpt2 (GPT-2's recipe), auto (gpu on CUDA)", choices=("auto", *PRESETS))
    device: str = flag("auto", "auto, cpu, cuda or mps", choices=("auto", "cpu", "cuda", "mps"))
    seed: int = flag(1337, "random seed", ("in [0, 2**63)", lambda x: 0 <= x < 2**63))
    tokenizer: str = flag("char", "char, or bpe (tokenizer_bpe.py)", choices=("char", "bpe"))
    vocab_size: int = flag(512, "BPE vocabulary size, with --tokenizer bpe", ("at least 257", lambda x: x >= 257))
    bpe_sample_mb: float = flag(10.0, "BPE learns its merges from the first this many MB of training text", POSITIVE)
    max_iters: int = flag(2000, "optimizer steps", COUNT)
    eval_interval: int = flag(500, "steps between evaluations and checkpoints", AT_LEAST_1)
    eval_iters: int = flag(20, "batches per split in each evaluation", AT_LEAST_1)
    log_interval: int = flag(100, "steps between log lines", AT_LEAST_1)
    batch_size: int = flag(32, "sequences per micro-batch", AT_LEAST_1)
    grad_accum: int = flag(1, "micro-batches per optimizer step (per process)", AT_LEAST_1)
    learning_rate: float = flag(6e-3, "peak learning rate", POSITIVE)
    min_lr_ratio: float = flag(0.1, "final learning rate as a fraction of the peak", ("in [0, 1]", lambda x: 0 <= x <= 1))
    warmup_iters: int = flag(100, "steps of linear learning-rate warmup", COUNT)
    weight_decay: float = flag(0.1, "AdamW weight decay on 2-D weights", NOT_NEGATIVE)
    beta2: float = flag(0.99, "AdamW beta2", BELOW_1)
    grad_clip: float = flag(1.0, "clip the gradient norm to this; 0 = off", NOT_NEGATIVE)
    optimizer: str = flag("adamw", "adamw, or muon (for the blocks' matrices; AdamW the rest)", choices=("adamw", "muon"))
    muon_lr: float = flag(0.02, "Muon's peak learning rate, scheduled as --learning-rate is", POSITIVE)
    dtype: str = flag("float32", "bfloat16: matmuls in bf16; auto: where native", choices=("float32", "bfloat16", "auto"))
    compile: bool = flag(False, "torch.compile the model (eager if it fails)")
    resume: bool = flag(False, "continue training from <out-dir>/ckpt.pt")
    overwrite: bool = flag(False, "replace a checkpoint in <out-dir>, else an error")
    init_from: str = flag("", "fine-tune from a checkpoint, or GPT-2: gpt2[-medium|-large|-xl], a HF dir, .safetensors")
    plot: bool = flag(True, "draw <out-dir>/loss.png from log.csv when training ends")
    sample: bool = flag(False, "only sample from <out-dir>/ckpt.pt (or from --init-from's model)")
    prompt: str = flag("", "text the sample continues (--evaluate: attention.png's); empty: a newline (a passage)")
    max_new_tokens: int = flag(500, "tokens to generate", COUNT)
    temperature: float = flag(0.8, "sampling temperature; 0 = greedy", NOT_NEGATIVE)
    top_k: int = flag(0, "sample among the k likeliest tokens; 0 = off", COUNT)
    top_p: float = flag(1.0, "nucleus: smallest set with this probability; 1 = off", ("in (0, 1]", lambda x: 0 < x <= 1))
    kv_cache: bool = flag(True, "generate with the KV cache (or recompute the context)")


# ---- Data: text -> token ids -> random (x, y) windows, y being x shifted by one ---------------

class CharTokenizer:
    """Every distinct character of the text is one token. Its interface is BPETokenizer's (tokenizer_bpe.py):
    the rest of the file never asks which of the two it holds."""

    def __init__(self, chars):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.vocab = dict(enumerate(chars))  # id -> character, as BPETokenizer.vocab is id -> bytes

    def encode(self, text, allowed_special="all"):  # BPE's special tokens: characters have none
        unknown = [ch for ch in dict.fromkeys(text) if ch not in self.stoi]  # in order of appearance
        if unknown:
            raise ValueError(f"character {unknown[0]!r} is not in the vocabulary of this character-level model "
                             f"({len(unknown)} unknown in all); use only characters of its training text, or a "
                             "--tokenizer bpe model")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in checked_ids(ids, len(self.chars)))


def make_tokenizer(cfg, chars, bpe_sample, log):
    """char: one token per character of the text (validation's too, so that none is unknown); bpe: merges
    learned from bpe_sample, the start of the training text only, so that they never peek at validation."""
    return CharTokenizer("".join(sorted(chars))) if cfg.tokenizer == "char" else train_bpe(bpe_sample, cfg.vocab_size, log)


@dataclasses.dataclass
class Data:
    """A run's text as token ids (train and val: a tensor, or a token file on disk, indexed alike) and its counts."""
    tokenizer: object
    train: object
    val: object
    unit: str  # "char" or "byte"
    val_units: int  # characters or bytes of the validation text
    characters: int  # of the whole text
    documents: int = 1


IN_MEMORY_BYTES = 10**7  # up to 10 MB: a text the lecture's way; larger ones, and corpora, through token files


def load_data(cfg, tokenizer, log):
    """One text file the lecture's way: read it, make the tokenizer (unless a checkpoint brings one), encode it;
    the first 90 % trains, the last 10 % validates. A corpus goes through token files on disk (Part III)."""
    if not (os.path.isfile(cfg.input) and not cfg.input.endswith(".jsonl") and os.path.getsize(cfg.input) <= IN_MEMORY_BYTES):
        return load_token_files(cfg, tokenizer, log)
    text = unicodedata.normalize("NFC", read_text(cfg.input))  # é one character, never e + a combining accent
    cut = int(0.9 * len(text))
    train_text, val_text = text[:cut], text[cut:]
    tokenizer = tokenizer or make_tokenizer(cfg, set(text), train_text[:int(cfg.bpe_sample_mb * 1e6)], log)
    train, val = (torch.tensor(tokenizer.encode(part, allowed_special="all")) for part in (train_text, val_text))
    unit = "char" if isinstance(tokenizer, CharTokenizer) else "byte"
    return Data(tokenizer, train, val, unit, len(val_text) if unit == "char" else len(val_text.encode("utf-8")), len(text))


def get_batch(data, batch_size, block_size, generator, device):
    """batch_size random windows: inputs x, and targets y that are x shifted one token on. data: the token
    ids, as a tensor or a token file (only the windows are read from disk)."""
    starts = torch.randint(len(data) - block_size, (batch_size, 1), generator=generator)  # (B, 1)
    windows = data[(starts + torch.arange(block_size + 1)).numpy()]  # (B, T+1), read in one go
    x, y = (torch.as_tensor(w, dtype=torch.long) for w in (windows[:, :-1], windows[:, 1:]))  # (B, T), (B, T)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ---- Attention: each token a weighted average of the tokens before it ------------------------------
# q, k, v: a query, a key and a value vector per position and head. Query t scores every key s by q_t · k_s;
# a softmax over the keys it may see (s <= t: a GPT must not see the future it predicts) makes the scores
# weights that sum to 1, and the output of t is the weighted average of the values.

def attention_math(q, k, v, dropout_p=0.0):
    """The formula written out: softmax(q kᵀ / √hd, the future masked to -inf) v. q (B, nh, T, hd) -> (B, nh, T, hd).
    Two extensions, a line each: with a KV cache, k and v hold L >= T positions, the T queries being the last
    T of them; with grouped-query heads, k and v have n_kv < nh heads, each shared by nh/n_kv query heads."""
    weights = attention_weights(q, k)  # (B, nh, T, L): each row sums to 1
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v.repeat_interleave(q.size(1) // v.size(1), dim=1)  # (B, nh, T, hd)


def attention_weights(q, k):
    """softmax(q kᵀ / √hd, the future masked to -inf): (B, nh, T, L), row t what query t takes from each key.
    Dividing by √hd keeps the scores' spread near 1 whatever the head size, so the softmax does not saturate."""
    T, L = q.size(2), k.size(2)
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, nh, L, hd): a key head per query head
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, L)
    future = torch.ones(T, L, dtype=torch.bool, device=q.device).triu(L - T + 1)  # query t sits at position L-T+t
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def attention_sdpa(q, k, v, dropout_p=0.0):
    """The same in one fused kernel that never stores the (T, L) weights, as FlashAttention (Part II) does."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # the CPU kernel in bf16 takes 3.4x as long
        return in_float32(attention_sdpa, q, k, v, dropout_p)  # as in float32, forward and backward (README)
    T, L = q.size(2), k.size(2)  # is_causal puts query t at key t: right only without cached keys (T == L)
    mask = None if T in (1, L) else torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(T == L and T > 1),
                                          dropout_p=dropout_p, enable_gqa=k.size(1) != q.size(1))


def pick_attention(name):
    """attention_flash, FlashAttention-2 from scratch, is a lesson of its own in Part II."""
    return {"sdpa": attention_sdpa, "math": attention_math, "flash": attention_flash}[name]


def rope_frequencies(head_dim, max_len, base=10000.0):
    """RoPE (--rope): cos and sin of the rotation angle of each position and frequency, (max_len, head_dim/2) each."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + hd/2]) by its position's angle; q·k then depends on the distance between
    two positions only. x (B, H, T, hd), cos/sin (T, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, hd/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # bf16 under autocast: mixing in float32 costs a third more
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of the tokens seen so far, so that each new token costs one position, not T."""

    def __init__(self, cfg, batch_size, device, dtype):
        # only n_kv_head heads are stored: grouped-query attention shrinks the cache n_head/n_kv_head times
        shape = cfg.n_layer, batch_size, cfg.kv_heads(), cfg.block_size, cfg.n_embd // cfg.n_head
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (n_layer, B, n_kv, block, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens cached = the position of the next token

    def update(self, layer, k, v):
        """Store k, v (B, n_kv, T, hd) after the cached ones; return all keys and values so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head attention: n_head heads of size n_embd/n_head attend side by side, and one projection mixes
    what they found. q, k and v of all heads come from one matrix multiplication."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads(), cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        # qk-norm: unit-RMS q and k per head bound q·k/√hd, so a large learning rate cannot saturate the softmax
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if cfg.qk_norm else None
        self.attn_dropout_p = cfg.dropout  # a probability: the attention function drops weights itself
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attend = pick_attention(cfg.attention)  # chosen once here, never per token

    def forward(self, x, rope=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                     self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        if self.q_norm is not None:  # in float32 (RMSNorm's weight is float32; under autocast q and k arrive in bf16)
            q, k = self.q_norm(q.float()).type_as(q), self.k_norm(k.float()).type_as(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, L, hd), L = cached + T
        y = self.attend(q, k, v, self.attn_dropout_p if self.training else 0.0)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.resid_dropout(self.proj(y))


# ---- The block: attention, then an MLP, each added to the residual stream --------------------------

def make_norm(cfg, width):
    """LayerNorm: (x - mean) / std * g + b over the last dim. RMSNorm (--norm rmsnorm): x / rms(x) * g, no
    centring and no bias; cheaper, and as good in practice: what keeps deep stacks stable is the scale."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=1e-5)
    return nn.LayerNorm(width, eps=1e-5, bias=cfg.bias)


def relu_squared(h):
    """Primer (So et al., 2021): relu(h)²; sparse like ReLU, but smooth at 0 and sharper for large h."""
    return F.relu(h).square()


def swiglu(h):
    """Shazeer (2020), used by LLaMA: half of h gates the other half through silu. (B, T, 2H) -> (B, T, H)"""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh(h):
    """GPT-2's GELU: tanh(√(2/π)(h + 0.044715 h³)) in place of erf, an approximation of 2016 (Hugging Face's
    gelu_new). At most 5e-4 from the exact one, but GPT-2's weights (Part II) expect it."""
    return F.gelu(h, approximate="tanh")


MLP_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu2": relu_squared, "swiglu": swiglu}


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # SwiGLU's hidden width 8C/3 makes its three C x H matrices hold the 8C² weights of GELU's two C x 4C
        hidden = 8 * cfg.n_embd // 3 if cfg.mlp == "swiglu" else 4 * cfg.n_embd
        self.fc = nn.Linear(cfg.n_embd, hidden * (2 if cfg.mlp == "swiglu" else 1), bias=cfg.bias)
        self.activation = MLP_ACTIVATIONS[cfg.mlp]
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.activation(self.fc(x))))  # (B, T, C) -> (B, T, H) -> (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block: the residual stream x only ever gets things added to it, so the gradient
    reaches the first layer undiminished. Post-LN (2017) normalises the stream itself after each add: the
    gradient then passes through every norm on its way down, which is why it needs a learning-rate warmup."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg, cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = make_norm(cfg, cfg.n_embd), MLP(cfg)
        self.post_ln, self.residual = cfg.post_ln, cfg.residual

    def forward(self, x, rope=None, cache=None, layer=0):
        keep = x if self.residual else 0  # --no-residual: each sublayer replaces x instead of adding to it
        if self.post_ln:
            x = self.ln_1(keep + self.attn(x, rope, cache, layer))
            keep = x if self.residual else 0
            return self.ln_2(keep + self.mlp(x))
        x = keep + self.attn(self.ln_1(x), rope, cache, layer)  # tokens talk to each other
        keep = x if self.residual else 0
        return keep + self.mlp(self.ln_2(x))  # each token thinks on its own


# ---- The GPT: embeddings, a stack of blocks, and logits over the vocabulary ------------------------
# GPT-2 is the path GPTConfig's defaults take. Each modern option is one difference from it, a few lines
# where the reader meets it (the README measures what each buys):
#   --rope          positions rotate q and k instead of a learned position table (rope_frequencies)
#   --norm rmsnorm  LayerNorm without the mean and the bias (make_norm)
#   --post-ln       the 2017 transformer's placement, for comparison: normalise after adding (Block)
#   --mlp relu2 / swiglu   other nonlinearities in the MLP (MLP_ACTIVATIONS; gelu_tanh is GPT-2's own GELU)
#   --qk-norm       queries and keys normalised per head, so their dot products cannot blow up
#   --untied-head   the output layer is not the token embedding table
#   --zero-init     every block starts as the identity: its output projections are zero
#   --softcap       logits squashed smoothly by tanh, so none runs away
#   --optimizer muon   orthogonalised updates for the blocks' matrices (make_optimizer)
#   --dtype bfloat16   mixed precision: matmuls in bf16, weights in float32 (make_autocast)
# `python gpt.py` (the cpu preset) turns on the ones that won when measured: muon, rope, swiglu, the untied
# head, and bf16 where the CPU multiplies it natively; --preset gpt2 turns them all off.

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token id -> vector: a lookup table
        self.wpe = None if cfg.rope else nn.Embedding(cfg.block_size, cfg.n_embd)  # position -> vector
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if not cfg.untied_head:
            self.lm_head.weight = self.wte.weight  # weight tying: reading and writing tokens share one table
        if cfg.rope:
            cos, sin = rope_frequencies(cfg.n_embd // cfg.n_head, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)  # derived, so not saved
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: keep the residual stream's variance flat in depth
            if name.endswith("proj.weight") and cfg.zero_init:  # each block starts as the identity
                nn.init.zeros_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # small logits: initial loss ~ ln(vocab)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy if targets are given."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0  # positions continue after the cached tokens
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.cfg.block_size}")
        x, rope = self.wte(idx), None  # (B, T, C)
        if self.cfg.rope:  # positions rotate q and k in each block
            rope = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hd/2) each
        else:  # positions have vectors of their own, added to the tokens'
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))  # (B, T, C) + (T, C)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if self.cfg.softcap:  # ~linear for small logits, never beyond ±softcap (Gemma 2)
            logits = self.cfg.softcap * torch.tanh(logits / self.cfg.softcap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(B * T))
        return logits, loss

    @torch.inference_mode()  # like no_grad, minus autograd's version bookkeeping: faster per token
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, use_cache=True, generator=None,
                 on_token=None):
        """Append max_new_tokens sampled tokens to idx (B, T): with the cache, the prompt once, then one token per
        step; without, the whole context every step. Past block_size the context slides to the newest half block
        (re-processed by the cache): each token sees at least block/2, and the re-processing is once per block/2."""
        check_generate(idx, max_new_tokens, self.cfg.vocab_size)
        check_sampling(temperature, top_k, top_p)
        was_training = self.training
        self.eval()  # no dropout while generating
        block = self.cfg.block_size
        window_start = max(0, idx.size(1) - block)
        cache = None
        for _ in range(max_new_tokens):
            if idx.size(1) - window_start > block:
                window_start = idx.size(1) - max(1, block // 2)
                cache = None
            context = idx[:, window_start:]  # (B, <= block)
            if use_cache:
                if cache is None:
                    cache = KVCache(self.cfg, idx.size(0), idx.device, self.wte.weight.dtype)
                logits, _ = self(context[:, cache.length:], cache=cache)  # the whole window, then 1 token
            else:
                logits, _ = self(context)
            next_id = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1), below
            idx = torch.cat([idx, next_id], dim=1)
            if on_token:  # say, print it: what is shown stays shown, even if Ctrl-C ends the rest
                on_token(idx)
        self.train(was_training)
        return idx

    @staticmethod
    def from_pretrained(name_or_path, **settings):  # OpenAI's GPT-2 weights in this model: Part II
        return gpt2_from_pretrained(name_or_path, **settings)


# ---- Generation: one token at a time, drawn from the softmax of the last logits --------------------

def sample_next_token(logits, temperature, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> next token ids (B, 1)."""
    check_sampling(temperature, top_k, top_p)
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or so small (1e-45) that float32 cannot divide by it
        return logits.argmax(dim=-1, keepdim=True)  # greedy: the limit as the temperature goes to 0
    logits = logits.float()
    # The best logit subtracted first, so a tiny temperature sends the others to -inf but the best to 0:
    # dividing first would give +inf, and softmax's inf - inf is nan.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # (B, V), all <= 0
    probs = F.softmax(top_k_only(logits, top_k) if top_k else logits, dim=-1)  # (B, V)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    try:
        return torch.multinomial(probs, num_samples=1, generator=generator)  # renormalises by itself
    except RuntimeError:  # nan or inf logits: there is no distribution to draw from
        raise ValueError("the model's next-token probabilities are not finite (nan): its weights are broken; "
                         "train it again") from None


def top_k_only(logits, k):
    """logits (B, V) with all but the k best of each row at -inf."""
    kth_best = torch.topk(logits, min(k, logits.size(-1))).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_best, float("-inf"))


def nucleus(probs, top_p):
    """probs (B, V) with only the smallest set of the likeliest tokens whose total reaches top_p kept."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the better tokens
    sorted_probs[:, 1:][before[:, 1:] >= top_p] = 0.0  # the best always stays (top_p < 1e-45 is 0 in float32)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def start_ids(tokenizer, prompt=""):
    """The prompt's ids; an empty one starts after a newline, where every speech of the text begins (in a character
    vocabulary without one, from its first character)."""
    if prompt:
        return tokenizer.encode(unicodedata.normalize("NFC", prompt), allowed_special="all")
    try:
        return tokenizer.encode("\n")
    except ValueError:
        return [0]


def print_sample(model, tokenizer, cfg, device):
    """A sample after --prompt, or after start_ids, which stay unshown, printed as it comes; then its speed."""
    idx = torch.tensor([start_ids(tokenizer, cfg.prompt)], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    shown = 0 if cfg.prompt else idx.size(1)  # tokens printed so far

    def show(idx, last=False):  # print the tokens not shown yet; a BPE token may end inside a character: it waits
        nonlocal shown
        text = tokenizer.decode(idx[0, shown:].tolist())
        if last or not text.endswith("\ufffd"):
            print(text, end="", flush=True)
            shown = idx.size(1)
    t0 = time.perf_counter()
    out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.kv_cache, generator, show)
    elapsed = time.perf_counter() - t0
    show(out, last=True)
    print()
    mc = model.cfg
    cache = KVCache(mc, 1, "meta", model.wte.weight.dtype)  # on the meta device: shapes, no memory
    cache_note = (f"KV cache {(cache.k.nbytes + cache.v.nbytes) / 1024:.0f} KiB ({mc.kv_heads()} of {mc.n_head} heads keep "
                  "K/V)") if cfg.kv_cache else "no KV cache: the whole context recomputed for every token"
    print(f"generated {cfg.max_new_tokens} tokens in {elapsed:.2f} s: {cfg.max_new_tokens / elapsed:.0f} tokens/s, {cache_note}")


# ---- Training: the schedule, the optimizer, evaluation ----------------------------------------------

def learning_rate(step, cfg):
    """1) linear warmup, 2) after decay the floor, 3) cosine from the peak down to the floor in between."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_iters:
        return peak * (step + 1) / cfg.warmup_iters
    if step >= cfg.max_iters:
        return floor
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)  # 0 -> 1
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def orthogonalise(G, dtype=torch.float32, steps=5, eps=1e-7):
    """Muon's core (Jordan et al., 2024): every singular value of G (m, n) pushed towards 1, its singular vectors
    kept (about U Vᵀ of G = U S Vᵀ), so the update moves the weights along every direction G found, not just the
    few that dominate it. Quintic Newton-Schulz, matmuls only: 5 steps bring them near [0.7, 1.2] (tiny ones less)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    if G.size(0) > G.size(1):
        X = X.T  # wide: X Xᵀ is then the smaller Gram matrix
    X = X / X.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: now every singular value is <= 1
    for _ in range(steps):
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)  # s -> a s + b s³ + c s⁵
    return X.T if G.size(0) > G.size(1) else X


class Muon(torch.optim.Muon):
    """torch.optim.Muon's step written out around orthogonalise(), which runs in ns_dtype: bfloat16 only where
    the hardware multiplies it natively (emulated, it made the default model's step 4x slower than float32)."""

    def __init__(self, params, ns_dtype, **settings):
        super().__init__(params, adjust_lr_fn="original", **settings)  # its lr scaling, which step() writes out
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):  # closure: torch's signature; training here never passes one
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                momentum = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                momentum.lerp_(p.grad, 1 - group["momentum"])
                update = orthogonalise(p.grad.lerp(momentum, group["momentum"]), self.ns_dtype)  # Nesterov's look-ahead
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                p.add_(update.to(p.dtype), alpha=-group["lr"] * math.sqrt(max(1, p.size(0) / p.size(1))))


def make_optimizer(model, cfg, device_type):
    """[AdamW], with weight decay on matrices only; with --optimizer muon, [AdamW, Muon]: Muon takes the blocks'
    matrices, the embeddings and the head stay with AdamW (a lookup table's rows are vectors, not one linear map)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if cfg.optimizer == "muon" and name.startswith("blocks.") and p.dim() == 2]
    rest = [p for _, p in named if all(p is not h for h in hidden)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")  # one kernel for all parameters instead of a loop
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), fused=fused)
    if not hidden:
        return [adamw]
    # Muon: momentum, then orthogonalise() the update; its lr is scaled by sqrt(max(1, rows/cols)) per matrix
    ns_dtype = torch.bfloat16 if native_bf16(device_type) else torch.float32
    muon = Muon(hidden, ns_dtype, lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
    muon.param_groups[0]["lr_scale"] = cfg.muon_lr / cfg.learning_rate  # the schedule sets lr * lr_scale
    return [adamw, muon]


def make_autocast(device_type, dtype):
    """Mixed precision: matmuls take bfloat16 inputs (float32's range, so no loss scaling) and add up in float32;
    weights, gradients and the optimizer stay float32. 'auto': bf16 where the hardware has it (native_bf16)."""
    if dtype == "auto":
        dtype = "bfloat16" if native_bf16(device_type) else "float32"
    return torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


@torch.no_grad()
def estimate_loss(model, splits, cfg, block_size, device, autocast):
    """Mean loss per split over eval_iters batches; the same batches every time, so evals compare."""
    model.eval()
    losses = {}
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(cfg.seed)
        total = 0.0
        for _ in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, block_size, generator, device)
            with autocast:
                total += model(x, y)[1].item()
        losses[name] = total / cfg.eval_iters
    model.train()
    return losses


# ---- The training loop: its steps first, in the order they run, then train() ---------------------

@dataclasses.dataclass
class Run:
    """What a training run carries from step to step, and saves in its checkpoint."""
    cfg: TrainConfig  # a resumed run's own settings, with what the command line sets again
    model: GPT  # the plain module: what we evaluate, save and sample (the steps may run a compiled or DDP wrapper)
    data: Data
    optimizers: list  # make_optimizer's: each is stepped in turn
    autocast: object  # the run's precision (make_autocast)
    tokens_per_step: int
    step: int = 0
    tokens: int = 0  # seen so far, across resumes (the batch may change on --resume)
    best_val_loss: float = math.inf
    resumed: bool = False
    local_loss: float = math.nan  # this rank's loss at the last log line, before the all-reduce (torchrun)
    started: float = 0.0  # the clock of log.csv's seconds: time.perf_counter() at step 0, across resumes
    last_log: tuple = (0.0, 0)  # time and step of the last log line or evaluation: ms/step counts the steps since


def prepare_run(cfg, model_cfg, given, rt):
    """A new run, or the checkpoint's to go on with (--resume), or a new one from a checkpoint's weights (--init-from)."""
    ckpt, model, tokenizer = None, None, None
    if cfg.resume:  # 1) the checkpoint's model and tokenizer, so that the ids mean the same
        ckpt, model, tokenizer, cfg = load_for_resume(cfg, model_cfg, given, rt.device)
    elif cfg.init_from:
        model, tokenizer = load_for_fine_tuning(cfg, model_cfg, given, rt.device)
        rt.log(f"fine-tuning {cfg.init_from}: its weights and tokenizer, a fresh optimizer and schedule")
    data = load_data(cfg, tokenizer, rt.log)  # 2) the text as token ids
    if model is None:
        model = GPT(dataclasses.replace(model_cfg, vocab_size=len(data.tokenizer.vocab))).to(rt.device)
    describe(data, model, cfg, rt)
    m = model.cfg
    run = Run(cfg, model, data, make_optimizer(model, cfg, rt.device_type), make_autocast(rt.device_type, cfg.dtype),
              cfg.batch_size * m.block_size * cfg.grad_accum * rt.world_size)
    if ckpt is not None:  # 3) the optimizer's state and the random state too: the run goes on exactly
        restore_run_state(run, ckpt, rt)
    run.started = -start_log_csv(cfg.out_dir, ckpt) if rt.master else 0.0  # minus the seconds before (Part III)
    return run


def evaluate_and_save(run, rt):
    """Rank 0 evaluates both splits, logs (bits per character or byte beside nats per token), and saves."""
    stop_if_diverged(run)  # never replace a good checkpoint with broken weights (Part III)
    if rt.master:
        splits = {"train": run.data.train, "val": run.data.val}
        losses = estimate_loss(run.model, splits, run.cfg, run.model.cfg.block_size, rt.device, run.autocast)
        run.best_val_loss = min(run.best_val_loss, losses["val"])
        bits = losses["val"] * len(run.data.val) / run.data.val_units / math.log(2)  # nats/token -> bits/unit
        rt.log(f"step {run.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
               f"(val {bits:.3f} bits/{run.data.unit})")
        log_row(run, learning_rate(run.step, run.cfg), losses["train"], losses["val"], bits)
        save_run(run, rt)
    run.last_log = time.perf_counter(), run.step  # evaluation time is not training time


def training_step(model, run, rt):
    """One optimizer step: 1) the learning rate, 2) gradients summed over grad_accum micro-batches (DDP
    all-reduces them in the last backward only), 3) clip, update. Returns the lr and the step's mean loss."""
    cfg = run.cfg
    lr = learning_rate(run.step, cfg)
    for group in (group for optimizer in run.optimizers for group in optimizer.param_groups):
        group["lr"] = lr * group.get("lr_scale", 1.0)
    step_loss = torch.zeros((), device=rt.device)
    batches = batch_generator(cfg.seed, run.step, rt.rank, rt.world_size)  # a resumed run draws the same batches
    for micro_step in range(cfg.grad_accum):
        x, y = get_batch(run.data.train, cfg.batch_size, run.model.cfg.block_size, batches, rt.device)
        last = micro_step == cfg.grad_accum - 1
        with nullcontext() if rt.world_size == 1 or last else model.no_sync():
            with run.autocast:
                _, loss = model(x, y)
            (loss / cfg.grad_accum).backward()
        step_loss += loss.detach() / cfg.grad_accum
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for optimizer in run.optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    run.tokens += run.tokens_per_step
    return lr, step_loss


def log_progress(run, rt, lr, step_loss):
    """The log line of a step: its loss (averaged over the ranks, in place), the learning rate, the speed."""
    run.local_loss = step_loss.item()  # this rank's batches only
    if rt.world_size > 1:
        dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
    stop_if_diverged(run, step_loss.item())
    seconds, steps = time.perf_counter() - run.last_log[0], run.step - run.last_log[1]
    rt.log(f"step {run.step}: loss {step_loss.item():.4f}, lr {lr:.2e}, {1000 * seconds / steps:.1f} ms/step, "
           f"{run.tokens_per_step * steps / seconds:,.0f} tokens/s")
    if rt.master:
        log_row(run, lr, step_loss.item())
    run.last_log = time.perf_counter(), run.step


def finish(run, rt, stopped, step_loss):
    """Rank 0 draws loss.png (Part II) and, unless the run was stopped, prints a sample."""
    end_data_parallel(rt, run, step_loss)
    ckpt, log, png = (os.path.join(run.cfg.out_dir, name) for name in ("ckpt.pt", "log.csv", "loss.png"))
    if rt.master and run.cfg.plot:
        m, n_params = run.model.cfg, sum(p.numel() for p in run.model.parameters())
        plot_losses(log, png, f"{n_params / 1e6:.2f} M parameters ({layers(m)}, {m.n_embd} wide) on "
                              f"{os.path.basename(os.path.normpath(run.cfg.input))}")
    if rt.master and not (stopped or rt.stop["requested"]) and run.cfg.max_new_tokens > 0:  # a signal in the last eval
        print_sample(run.model, run.data.tokenizer, run.cfg, rt.device)
    if not stopped:
        rt.log(f"saved {ckpt}, {log}" + f" and {png}" * run.cfg.plot)


def train(cfg, model_cfg, given=frozenset()):
    """python gpt.py: train, evaluate and save every eval_interval steps and at the end (Ctrl-C or SIGTERM: at the
    end of the step, then stop); then loss.png and a sample. given: the flags typed on the command line."""
    with claim_out_dir(cfg):  # this run alone writes into --out-dir, and replaces no checkpoint unasked (Part III)
        rt = setup_runtime(cfg)  # the device; under torchrun, this process's rank (Part III)
        run = prepare_run(cfg, model_cfg, given, rt)
        model = wrap_model(run, rt)  # what the steps run: compiled (--compile), data-parallel (torchrun), or as is
        first_step, stopped, step_loss = run.step, False, torch.full((), math.nan)
        run.started, run.last_log = run.started + time.perf_counter(), (time.perf_counter(), run.step)
        with stop_on_signals(rt.stop):  # a signal only asks the loop to stop between steps (Part III)
            while True:
                if (run.step % run.cfg.eval_interval == 0 or run.step == run.cfg.max_iters) and not (
                        run.resumed and run.step == first_step):  # a resumed run was evaluated at its step
                    evaluate_and_save(run, rt)
                if run.step >= run.cfg.max_iters:
                    break
                stopped = stop_agreed(run, rt)  # Ctrl-C, SIGTERM or a closed stdout
                if stopped:
                    save_and_say_how_to_resume(run, rt)
                    break
                lr, step_loss = training_step(model, run, rt)
                run.step += 1
                if run.step % run.cfg.log_interval == 0 or run.step == run.cfg.max_iters:
                    log_progress(run, rt, lr, step_loss)
        finish(run, rt, stopped, step_loss)
    if rt.world_size > 1:
        exit_before_gloo_threads_can_abort()  # after the out-dir's lock is released
    return run.model


# ==============================================================================================
# Part II — further lessons
# ==============================================================================================

# What a list flag of the lab takes: (what to say, the test).
NUMBERS = ("comma-separated positive numbers", lambda text: all(0 < number(x, float) < math.inf for x in text.split(",")))
INTEGERS = ("comma-separated positive integers", lambda text: all(number(x, int) > 0 for x in text.split(",")))
SEEDS = ("comma-separated integers >= 0", lambda text: all(number(x, int) >= 0 for x in text.split(",")))


@dataclasses.dataclass
class LabConfig:
    """The lab's flags: each study replaces training (run_study); its options only go with it."""
    sweep: bool = flag(False, "scaling-law sweep: train every width at every budget")
    sweep_budgets: str = flag("3e11,1e12,3e12", "training FLOPs of each sweep budget", NUMBERS)
    sweep_widths: str = flag("16,24,32,48,64", "n_embd of each sweep model", INTEGERS)
    ablation: str = flag("", "options or depth: every row, every --ablation-seeds", choices=("", "options", "depth"))
    ablation_seeds: str = flag("1,2,3", "seeds of each ablation row", SEEDS)
    embeddings: bool = flag(False, "show what <out-dir>/ckpt.pt's token embeddings learned")
    bench_attention: bool = flag(False, "only time sdpa, math and flash for T = 256 ... 16384, and their memory")
    bench_mem_gib: float = flag(6.0, "memory cap of each --bench-attention case (GiB)", POSITIVE)
    bench_data: int = flag(0, "only benchmark the data path on corpora of 10 MB up to this many MB", COUNT)
    explain_attention: bool = flag(False, "only print attention built from the ground up: each step's code and numbers")
    evaluate: str = flag("", "only measure <out-dir>/ckpt.pt on this text (as --input): loss, surprises, heads")


LAB_FLAGS = frozenset(field.name for field in dataclasses.fields(LabConfig))
STUDY_OPTIONS = {"sweep": ("sweep_budgets", "sweep_widths"), "ablation": ("ablation_seeds",),
                 "bench_attention": ("bench_mem_gib",)}
READING_STUDIES = {"evaluate": {"out_dir", "device", "seed", "prompt", "init_from"},  # the other flags they take;
                   "embeddings": {"out_dir", "seed"}, "explain_attention": set()}  # the model is the checkpoint's


def run_study(cfg, model_cfg, given, lab):
    """python gpt.py --<study>: the one study asked for; an option without its study would do nothing: refused."""
    if "evaluate" in given and not lab.evaluate:  # say, an unset shell variable: no text, not a training run
        raise ValueError("--evaluate needs a text: a file, a directory or a quoted glob")
    options = {option: study for study, names in STUDY_OPTIONS.items() for option in names}
    studies = [name for name in LAB_FLAGS - set(options) if getattr(lab, name)]
    for option in given & set(options):
        if options[option] not in studies:
            raise ValueError(f"--{option.replace('_', '-')} goes with --{options[option].replace('_', '-')}: add that, "
                             "or leave it out")
    if len(studies) != 1:
        raise ValueError(f"one study at a time, not {', '.join('--' + s.replace('_', '-') for s in sorted(studies)) or 'none'}")
    if studies[0] in READING_STUDIES:
        note_ignored(f"--{studies[0].replace('_', '-')}", given - LAB_FLAGS - READING_STUDIES[studies[0]])
    {"bench_attention": lambda: bench_attention(pick_device(cfg.device), lab.bench_mem_gib),
     "bench_data": lambda: bench_data(cfg, lab.bench_data, "out_dir" in given),
     "sweep": lambda: scaling_sweep(cfg, model_cfg, lab), "ablation": lambda: ablation(cfg, model_cfg, lab),
     "embeddings": lambda: show_embeddings(cfg), "explain_attention": explain_attention,
     "evaluate": lambda: evaluate_checkpoint(cfg, lab.evaluate)}[studies[0]]()


# ---- Running the real GPT-2: OpenAI's weights in our model (GPT.from_pretrained, --init-from gpt2) -----------
# Our GPT is GPT-2's architecture (pre-LN blocks, learned positions, LayerNorm with biases, scores scaled by
# 1/√hd, the head tied to the token table), so the weights OpenAI published in 2019 load into it as they are,
# once four things are taken care of:
#   - their files are safetensors: a JSON header, then the raw arrays (read_safetensors)
#   - their names differ: h.0.attn.c_attn.weight is our blocks.0.attn.qkv.weight (HF_NAMES)
#   - their blocks' matrices are "Conv1D" layers, stored (in, out): nn.Linear stores (out, in) (gpt2_state_dict)
#   - their GELU is the tanh approximation: --mlp gelu_tanh (gpt2_config)
# The files come from the Hugging Face hub, downloaded once into a cache; the tokenizer is GPT-2's BPE in our
# BPETokenizer, so a checkpoint fine-tuned from GPT-2 carries it. The tests hold the result to Hugging Face's
# transformers: the same logits within 1e-5, the same greedy generation, the same loss.

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124 M, 350 M, 774 M and 1,558 M parameters
HUB_URL = "https://huggingface.co"  # a constant, so that a test can serve the files from 127.0.0.1
HUB_FILES = ("config.json", "model.safetensors", "vocab.json")


def gpt2_from_pretrained(name_or_path, dropout=0.0, attention="sdpa"):
    """GPT-2 in our GPT, on the CPU: a name of GPT2_SIZES (downloaded once), a Hugging Face model directory, or
    its model.safetensors (config.json beside it). dropout: for fine-tuning."""
    folder, weights_path = gpt2_files(name_or_path)
    cfg = gpt2_config(os.path.join(folder, "config.json"), dropout, attention)
    with torch.device("meta"):  # shapes only: no memory, no random init of weights about to be replaced
        model = GPT(cfg)
    model.load_state_dict(gpt2_state_dict(read_safetensors(weights_path), model, weights_path), assign=True)
    if not cfg.untied_head:  # assign=True gave the head and the token table a parameter each: one again
        model.lm_head.weight = model.wte.weight
    return model.eval()


def gpt2_files(name_or_path):
    """(the folder, the weights file): a name's files are downloaded into the cache, once."""
    if name_or_path in GPT2_SIZES:
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llm-from-scratch",
                              name_or_path)
        for filename in HUB_FILES:
            download(f"{HUB_URL}/openai-community/{name_or_path}/resolve/main/{filename}",
                     os.path.join(folder, filename))
        return folder, os.path.join(folder, "model.safetensors")
    folder, weights_path = (name_or_path, os.path.join(name_or_path, "model.safetensors")) \
        if os.path.isdir(name_or_path) else (os.path.dirname(name_or_path), name_or_path)
    if not os.path.isfile(weights_path) and os.path.isfile(os.path.join(name_or_path, "ckpt.pt")):
        raise ValueError(f"{name_or_path} is a run's --out-dir: pass --init-from {os.path.join(name_or_path, 'ckpt.pt')}")
    if not os.path.isfile(weights_path):
        raise ValueError(f"{weights_path}: no such file; --init-from takes a checkpoint (ckpt.pt), or GPT-2: "
                         f"{', '.join(GPT2_SIZES)}, a Hugging Face model directory or its model.safetensors (not "
                         "pytorch_model.bin, a pickle)")
    return folder, weights_path


# The safetensors format, whole: 8 bytes, the length n of the header (little-endian); n bytes of JSON,
# {name: {"dtype": "F32", "shape": [768, 2304], "data_offsets": [begin, end]}, ...}; then the tensors' bytes,
# row-major and little-endian (as x86 and ARM are), each at begin..end counted from the end of the header.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file, each a view of the file memory-mapped: a tensor's bytes are read
    from disk when it is first used, and a 6 GB file is never held twice. A bad file: a one-line error."""
    if sys.byteorder != "little":  # the file's arrays are little-endian; frombuffer reads the machine's order
        raise ValueError(f"{path}: safetensors holds little-endian numbers; this reader needs a little-endian CPU")
    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: torch wants a writable buffer
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
        return {name: tensor_at(data, 8 + n, name, entry) for name, entry in header.items()}
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror})") from None
    except NotImplementedError as err:  # a dtype this reader lacks: the file is fine
        raise ValueError(f"{path}: {err}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, an entry not a dict, ...
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({err}); download it again") from None


def tensor_at(data, start, name, entry):
    """One tensor of the file, once its entry is checked: a known dtype, and bytes that are there and fit."""
    dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
    if dtype is None:
        raise NotImplementedError(f"tensor {name} is {entry['dtype']}; this reader takes "
                                  f"{', '.join(SAFETENSORS_DTYPES)}")
    if not all(type(size) is int and size >= 0 for size in shape) or not 0 <= begin <= end <= len(data) - start \
            or end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name}: bytes {begin}..{end} of {len(data) - start} for {shape} {entry['dtype']}")
    if math.prod(shape) == 0:  # frombuffer reads at least one element
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start + begin).view(shape)


# config.json's settings that our GPT has one way only: (the value when absent, the values it can run).
GPT2_SETTINGS = {"model_type": ("gpt2", ["gpt2"]),
                 "activation_function": ("gelu_new", ["gelu_new", "gelu_pytorch_tanh"]),  # the tanh GELU, 2 names
                 "layer_norm_epsilon": (1e-5, [1e-5]),  # make_norm's
                 "scale_attn_weights": (True, [True]),  # scores / √hd
                 "scale_attn_by_inverse_layer_idx": (False, [False]),
                 "add_cross_attention": (False, [False])}


def gpt2_config(path, dropout=0.0, attention="sdpa"):
    """Our GPTConfig from a Hugging Face GPT-2 config.json: the sizes it gives, GPT-2's design (GPTConfig's
    defaults) with the tanh GELU; or a one-line error if it is not GPT-2's architecture."""
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
        unlike = [(key, hf[key], runs[0]) for key, (absent, runs) in GPT2_SETTINGS.items()
                  if hf.get(key, absent) not in runs]
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: cannot read a GPT-2 config.json ({err}); put the model's own beside its "
                         "weights") from None
    if unlike:
        raise ValueError(f"{path}: {unlike[0][0]} is {unlike[0][1]!r}, GPT-2's is {unlike[0][2]!r}; gpt.py runs GPT-2's "
                         "architecture only")
    return GPTConfig(block_size=hf.get("n_positions", 1024), n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
                     n_embd=hf.get("n_embd", 768), vocab_size=hf.get("vocab_size", 50257), dropout=dropout,
                     attention=attention, mlp="gelu_tanh", untied_head=not hf.get("tie_word_embeddings", True))


HF_NAMES = {"blocks.": "h.", ".qkv.": ".c_attn.", ".proj.": ".c_proj.", ".fc.": ".c_fc."}  # ours -> theirs


def hf_name(ours, prefix):
    """blocks.0.attn.qkv.weight -> h.0.attn.c_attn.weight, after prefix ("transformer." in some files)."""
    for mine, theirs in HF_NAMES.items():
        ours = ours.replace(mine, theirs)
    return ours if ours == "lm_head.weight" else prefix + ours


def gpt2_state_dict(tensors, model, path):
    """Our state dict from their tensors: each renamed, its shape checked against our model's (on the meta device),
    copied out of the file as float32. A block's four matrices are Conv1D (in, out): transposed to (out, in).
    Left out: the causal masks that old files keep (attn.bias; SDPA needs none), and a tied head's copy."""
    prefix = "transformer." if "transformer.wte.weight" in tensors else ""  # GPT2LMHeadModel's files; not GPT2Model's
    state = {}
    for ours, like in model.state_dict().items():
        if ours == "lm_head.weight" and not model.cfg.untied_head:
            continue
        theirs = hf_name(ours, prefix)
        conv1d = ours.startswith("blocks.") and like.dim() == 2  # every matrix in a block is one
        if theirs not in tensors:
            raise ValueError(f"{path}: tensor {theirs} is missing; not GPT-2's weights, or a damaged file")
        tensor = tensors[theirs].t() if conv1d else tensors[theirs]
        if tensor.shape != like.shape:
            raise ValueError(f"{path}: tensor {theirs} has shape {list(tensors[theirs].shape)}, the model needs "
                             f"{list(like.shape)[::-1] if conv1d else list(like.shape)}")
        state[ours] = tensor.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if not model.cfg.untied_head:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def crop_block_size(model, block_size):
    """A shorter context than the one GPT-2 learned: its first block_size positions, which compute as before (the
    attention is causal). --block-size 256 fine-tunes GPT-2 several times faster than its 1,024 on a CPU."""
    if block_size > model.cfg.block_size:
        raise ValueError(f"--block-size {block_size} is longer than the {model.cfg.block_size} positions GPT-2 learned")
    model.cfg = dataclasses.replace(model.cfg, block_size=block_size)
    model.wpe = nn.Embedding.from_pretrained(model.wpe.weight[:block_size].detach().clone(), freeze=False)
    return model


def download(url, path):
    """url -> path, unless path is there. Written to a temp name and renamed when whole, so an interrupted
    download never looks finished; a failure is one line that says how to do without the network."""
    if os.path.exists(path):
        return
    import http.client
    import urllib.request  # only downloads need them
    part = f"{path}.{os.getpid()}.part"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        request = urllib.request.Request(url, headers={"User-Agent": "llm-from-scratch"})
        with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = copy_with_progress(response, out, f"{os.path.basename(os.path.dirname(path))} "
                                      f"{os.path.basename(path)}", total)
        if total and done != total:
            raise ConnectionError(f"the connection closed after {done:,} of {total:,} bytes")
        os.replace(part, path)
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts and a full disk are OSErrors
        reason = getattr(err, "reason", None) or err  # URLError's reason says why
        raise ValueError(f"cannot download {url} ({reason}); without a network, put the file at {path}, or pass "
                         "--init-from a local model directory or .safetensors file") from None
    finally:  # failed or interrupted (Ctrl-C too): no partial file left behind, each a GB for gpt2-xl
        with suppress(OSError):
            os.remove(part)


def copy_with_progress(response, out, label, total):
    """Copy, showing 'downloading gpt2 model.safetensors: 120/548 MB': in place on a terminal, a line every 5 s
    in a pipe (a log would fill up with updates), and a last line when done."""
    done, shown, tty = 0, time.monotonic(), sys.stdout.isatty()
    start, end, of_total = "\r" if tty else "", "" if tty else "\n", f"/{total / 1e6:.0f}" if total else ""
    while block := response.read(1 << 20):
        out.write(block)
        done += len(block)
        if time.monotonic() - shown >= (0.2 if tty else 5.0):
            print(f"{start}downloading {label}: {done / 1e6:.0f}{of_total} MB", end=end, flush=True)
            shown = time.monotonic()
    print(f"{start}downloaded {label}: {done / 1e6:.1f} MB", flush=True)
    return done


def gpt2_tokenizer(folder):
    """GPT-2's BPE as our BPETokenizer (so a checkpoint carries it): from the vocab.json in folder, else tiktoken's
    "gpt2" (downloaded once by tiktoken). vocab.json's ids are the ranks, the order of the merges; its tokens
    are spelled one printable character per byte: the byte itself, or for the 68 bytes that are not printable
    (or a space) chr(256), chr(257), ... in order."""
    import tiktoken
    import tokenizer_bpe
    path = os.path.join(folder, "vocab.json")
    if os.path.isfile(path):
        printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
        others = [b for b in range(256) if b not in printable]
        spelling = {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}
        try:
            with open(path, encoding="utf-8") as f:
                vocab = json.load(f)
            ranks = {bytes(spelling[ch] for ch in token): i for token, i in vocab.items() if token != "<|endoftext|>"}
        except (ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{path}: not GPT-2's vocab.json ({type(err).__name__}); download it again") from None
        special = {name: i for name, i in vocab.items() if name == "<|endoftext|>"}
        encoding = tiktoken.Encoding("gpt2", pat_str=tokenizer_bpe.GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=special)
    else:
        encoding, problem = tokenizer_bpe.load_encoding("gpt2")
        if encoding is None:
            raise ValueError(f"no vocab.json in {folder}, and tiktoken cannot load GPT-2's tokenizer ({problem}); "
                             "put GPT-2's vocab.json there")
    return tokenizer_bpe.BPETokenizer.from_tiktoken(encoding)


# ---- FlashAttention-2 from scratch (--attention flash) ------------------------------------------
# attention_math's formula computed tile by tile, so that no (T, L) matrix ever exists: memory grows as T,
# not T * L. The names are the paper's (Dao, 2023):
#   S = Q K^T / sqrt(hd)  the scores of one tile of queries against one tile of keys
#   m                     the running maximum of each query row's scores, so that exp never overflows
#   l                     the running sum of exp(S - m) of each row: the softmax denominator so far
#   O                     the running sum of exp(S - m) V; divided by l once all key tiles are seen
#   LSE = m + log(l)      each row's log-sum-exp: all that forward keeps for backward, besides O
#   D = rowsum(dO * O)    each row's term of the softmax's backward, computed once per backward
# When a key tile raises a row's maximum from m_old to m_new, the l and O kept so far are sums of
# exp(S - m_old): multiplying them by exp(m_old - m_new) puts them on the new maximum's scale.

FLASH_BLOCK_Q, FLASH_BLOCK_K = 256, 256  # positions per tile: the fastest of 12 pairs from 64 to 1024 at T = 4096 on CPU


def attention_flash(q, k, v, dropout_p=0.0, block_q=FLASH_BLOCK_Q, block_k=FLASH_BLOCK_K):
    """attention_math's signature and result. Rows of the grouped layout: row t*g + i is query t of head
    i of its group (g = nh / n_kv query heads per key/value head), so a tile of query positions is a
    slice of rows and the heads of a group share each key tile that is loaded."""
    if q.dtype in (torch.bfloat16, torch.float16):  # under autocast: the running m, l and the LSE need float32
        return in_float32(attention_flash, q, k, v, dropout_p)
    B, nh, T, hd = q.shape
    n_kv = k.size(1)
    g = nh // n_kv
    seed = int(torch.randint(2**62, ())) if dropout_p > 0 else 0  # drawn from torch's RNG: torch.manual_seed rules
    rows = q.view(B, n_kv, g, T, hd).transpose(2, 3).reshape(B, n_kv, T * g, hd)  # (B, n_kv, T*g, hd)
    O = FlashAttention.apply(rows, k, v, g, dropout_p, seed, block_q, block_k)  # (B, n_kv, T*g, hd)
    return O.view(B, n_kv, T, g, hd).transpose(2, 3).reshape(B, nh, T, hd)


def tile_scores(Qi, Kj, i0, i1, j0, j1, offset, g):
    """S of query positions i0..i1-1 (at offset + i; Qi already scaled by 1/sqrt(hd)) against keys
    j0..j1-1, with the causal future at -inf."""
    S = Qi @ Kj.transpose(-2, -1)  # (B, n_kv, (i1-i0)*g, j1-j0)
    if j1 - 1 > offset + i0:  # the tile reaches past its first query's position: mask the future
        pos = offset + torch.arange(i0, i1, device=S.device).repeat_interleave(g)  # each row's position
        S.masked_fill_(torch.arange(j0, j1, device=S.device) > pos[:, None], float("-inf"))
    return S


def tile_dropout(P, dropout_p, seed):
    """The keep-mask of one tile, scaled by 1/(1-p), from the tile's own seed: backward regenerates
    exactly the mask that forward used, and nothing of it is stored."""
    gen = torch.Generator(device=P.device).manual_seed(seed)
    return (torch.rand(P.shape, generator=gen, device=P.device, dtype=P.dtype) >= dropout_p) / (1 - dropout_p)


def flash_forward(q, k, v, g, dropout_p, seed, block_q, block_k):
    """q (B, n_kv, T*g, hd) in rows, k and v (B, n_kv, L, hd) -> O like q, LSE (B, n_kv, T*g)."""
    T, L = q.size(2) // g, k.size(2)
    O, LSE = torch.empty_like(q), q.new_empty(q.shape[:-1])
    for i0 in range(0, T, block_q):  # one tile of queries at a time, all batches and heads at once
        i1 = min(T, i0 + block_q)
        rows = slice(i0 * g, i1 * g)
        Qi = q[:, :, rows] / math.sqrt(q.size(-1))  # (B, n_kv, rows, hd)
        m = Qi.new_full(Qi.shape[:-1], float("-inf"))  # (B, n_kv, rows)
        l = Qi.new_zeros(Qi.shape[:-1])  # (B, n_kv, rows)
        Oi = torch.zeros_like(Qi)  # (B, n_kv, rows, hd)
        for j0 in range(0, L - T + i1, block_k):  # key tiles wholly after the last query: skipped
            j1 = min(L, j0 + block_k)
            S = tile_scores(Qi, k[:, :, j0:j1], i0, i1, j0, j1, L - T, g)  # (B, n_kv, rows, cols)
            m_new = torch.maximum(m, S.amax(dim=-1))  # finite: every query sees key 0, in the first tile
            P = S.sub_(m_new.unsqueeze(-1)).exp_()  # unnormalised probabilities (in place: S is not needed)
            alpha = (m - m_new).exp_()  # rescales what was summed relative to m_old
            l = l.mul_(alpha).add_(P.sum(dim=-1))
            if dropout_p > 0:  # after l: dropout acts on the probabilities, not on their denominator
                P.mul_(tile_dropout(P, dropout_p, seed + i0 * L + j0))
            Oi = Oi.mul_(alpha.unsqueeze(-1)).add_(P @ v[:, :, j0:j1])
            m = m_new
        O[:, :, rows] = Oi / l.unsqueeze(-1)
        LSE[:, :, rows] = m + l.log()
    return O, LSE


def flash_backward(dO, q, k, v, O, LSE, g, dropout_p, seed, block_q, block_k):
    """dq, dk, dv tile by tile, each tile's probabilities recomputed from q, k and the saved LSE."""
    T, L = q.size(2) // g, k.size(2)
    D = (dO * O).sum(dim=-1)  # (B, n_kv, T*g): rowsum(dP * P) of the softmax backward, without P
    q = q / math.sqrt(q.size(-1))  # the scaled queries give S, and dk = dS^T (q / sqrt(hd))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for j0 in range(0, L, block_k):  # key tiles outside, as FA2: a tile's dk and dv build up in one place
        j1 = min(L, j0 + block_k)
        Kj, Vj = k[:, :, j0:j1], v[:, :, j0:j1]  # (B, n_kv, cols, hd)
        dKj, dVj = torch.zeros_like(Kj), torch.zeros_like(Vj)
        for i0 in range(max(0, j0 - (L - T)) // block_q * block_q, T, block_q):  # the tiles forward ran
            i1 = min(T, i0 + block_q)
            rows = slice(i0 * g, i1 * g)
            Qi, dOi = q[:, :, rows], dO[:, :, rows]  # (B, n_kv, rows, hd)
            S = tile_scores(Qi, Kj, i0, i1, j0, j1, L - T, g)
            P = S.sub_(LSE[:, :, rows].unsqueeze(-1)).exp_()  # forward's probabilities, exactly
            dP = dOi @ Vj.transpose(-2, -1)  # (B, n_kv, rows, cols)
            if dropout_p > 0:  # the same mask as forward, from the same seed
                Z = tile_dropout(P, dropout_p, seed + i0 * L + j0)
                dVj += (P * Z).transpose(-2, -1) @ dOi
                dP.mul_(Z)
            else:
                dVj += P.transpose(-2, -1) @ dOi  # rows hold all g heads of the group: sums over them
            dS = dP.sub_(D[:, :, rows].unsqueeze(-1)).mul_(P)  # the softmax's backward
            dq[:, :, rows] += dS @ Kj
            dKj += dS.transpose(-2, -1) @ Qi
        dk[:, :, j0:j1], dv[:, :, j0:j1] = dKj, dVj
    return dq / math.sqrt(q.size(-1)), dk, dv


def flash_autograd_forward(ctx, q, k, v, g, dropout_p, seed, block_q, block_k):
    O, LSE = flash_forward(q, k, v, g, dropout_p, seed, block_q, block_k)
    ctx.save_for_backward(q, k, v, O, LSE)  # all that backward needs: no (T, L) matrix
    ctx.args = g, dropout_p, seed, block_q, block_k
    return O


def flash_autograd_backward(ctx, dO):
    dq, dk, dv = flash_backward(dO, *ctx.saved_tensors, *ctx.args)
    return dq, dk, dv, None, None, None, None, None  # no gradient for g, dropout_p, seed and the tile sizes


class FlashAttention(torch.autograd.Function):
    """The two passes joined for autograd: it keeps only q, k, v, O and LSE between them."""
    forward = staticmethod(flash_autograd_forward)
    backward = staticmethod(flash_autograd_backward)


# ---- Attention three ways, timed and measured (--bench-attention) ----------------------------------
# math stores the (T, T) weights of every head, so its memory grows as T²; sdpa and flash grow as T.

BENCH_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def bench_attention(device, mem_gib, lengths=BENCH_LENGTHS, impls=("sdpa", "math", "flash")):
    """Forward+backward time and peak memory of each attention at batch 1, 4 heads, head size 64,
    causal, float32. Each case runs in a fresh process, so one case's memory cannot hide in another's
    peak, and one that runs out of memory is a row of the table, not the end of the benchmark."""
    if os.name == "nt" and not device.startswith("cuda"):
        raise ValueError("--bench-attention measures CPU memory with Linux and macOS tools; run it there, or on CUDA")
    threads = f"{torch.get_num_threads()} thread" + "s" * (torch.get_num_threads() > 1)
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    memory = ("torch.cuda.max_memory_allocated" if device.startswith("cuda") else
              f"peak RSS growth of a fresh process, capped at {mem_gib:g} GiB")
    print(f"attention forward+backward: batch 1, 4 heads, head size 64, causal, float32, on {device} "
          f"({threads}{load}); memory: {memory}")
    print(f"{'T':>6} " + "".join(f"{name + ' ms':>11}" for name in impls) + "  " + "".join(f"{name + ' MiB':>12}" for name in impls))
    results = {}
    for T in lengths:
        cases = [bench_in_child(impl, T, device, mem_gib) for impl in impls]
        results.update({(impl, T): case for impl, case in zip(impls, cases)})
        times = "".join(f"{case['ms']:>11.1f}" if "ms" in case else f"{'-':>11}" for case in cases)
        peaks = "".join(f"{case['peak'] / 2**20:>12.1f}" if "peak" in case else f"{'-':>12}" for case in cases)
        errors = "; ".join(f"{impl}: {case['error']}" for impl, case in zip(impls, cases) if "error" in case)
        print(f"{T:>6} {times}  {peaks}" + (f"  ({errors})" if errors else ""), flush=True)
    return results


def bench_in_child(impl, T, device, mem_gib):
    """Run bench_case in a fresh Python; its last line of output is a JSON dict."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import gpt; gpt.bench_case(*sys.argv[2:])"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        done = subprocess.run([sys.executable, "-c", code, here, impl, str(T), device, str(mem_gib)],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "over 10 minutes"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"crashed with exit code {done.returncode}: {last[:120]}"}
    return json.loads(lines[-1])


def bench_case(impl, T, device, mem_gib):
    """In the fresh process: print {"ms": best forward+backward time, "peak": bytes} or {"error": ...}."""
    T, mem_gib, cuda = int(T), float(mem_gib), device.startswith("cuda")
    attend = pick_attention(impl)

    def run(T):
        """forward+backward once, in seconds; q, k, v, dy (1, 4, T, 64)"""
        q, k, v, dy = (torch.randn(1, 4, T, 64, device=device, requires_grad=i < 3) for i in range(4))
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        attend(q, k, v, 0.0).backward(dy)
        sync()
        return time.perf_counter() - t0

    run(16)  # the first call starts threads and allocators: part of the baseline, not of the case
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = start_counting_memory(mem_gib)
    try:
        times = [run(T)]
        while len(times) < 5 and sum(times) < 2.0:  # the best of up to 5 runs, or of those that fit in ~2 s
            times.append(run(T))
    except (RuntimeError, MemoryError) as err:
        if not isinstance(err, (MemoryError, torch.OutOfMemoryError)) and "allocate memory" not in str(err):
            raise
        print(json.dumps({"error": "out of GPU memory" if cuda else f"out of memory at the {mem_gib:g} GiB cap"}))
        return
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    print(json.dumps({"ms": 1000 * min(times), "peak": peak - baseline}))


def peak_rss():
    """The most memory this process has had resident, in bytes: Linux's VmHWM (ru_maxrss would also
    count the parent's size, which a child inherits at exec), else ru_maxrss (resource is Unix-only)."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status", encoding="utf-8") as f:
            return 1024 * int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def start_counting_memory(gib):
    """On Linux: 1) give freed memory back and make the resident size now the peak, or the imports'
    leftovers would hide a small case; 2) let the process map at most gib GiB more, so that an allocation
    past the cap fails here, as an error the case reports, never taking memory from the rest of the
    machine. Returns the peak to count from."""
    if os.path.exists("/proc/self/clear_refs"):
        import ctypes
        import resource
        getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)(0)  # glibc's; other C libraries lack it
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # resets VmHWM, the peak resident size (Linux >= 4.0)
        with open("/proc/self/statm", encoding="utf-8") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + int(gib * 2**30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    return peak_rss()


# ---- Experiments: loss curves -------------------------------------------------------------------

def read_csv(path):
    """A CSV file of numbers as a list of dicts; empty cells become None."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]


def new_figure(rows=1, cols=1, figsize=(7, 4.5)):
    """matplotlib is imported here only: training, sampling and the tests that do not draw never load it.
    Agg renders to files, so no display is needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"axes.formatter.min_exponent": 3})  # 0.5, 2, 300 rather than 5e-1, 2e0, 3e2
    return plt, *plt.subplots(rows, cols, figsize=figsize)


def save_figure(plt, fig, path, dpi=110, bbox_inches="tight"):
    """The picture as a PNG file, written whole or not at all (a full disk is a one-line error)."""
    with replaced_whole(path, "the picture") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches=bbox_inches)
    plt.close(fig)


def plot_losses(csv_path, png_path, title):
    """loss.png: the logged training loss, and train/val loss at each evaluation, against tokens seen."""
    rows = read_csv(csv_path)
    logged = [r for r in rows if r["val_loss"] is None]
    evals = [r for r in rows if r["val_loss"] is not None]
    plt, fig, ax = new_figure()
    ax.plot([r["tokens"] for r in logged], [r["train_loss"] for r in logged], lw=0.8, alpha=0.6, label="train (batch)")
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        ax.plot([r["tokens"] for r in evals], [r[key] for r in evals], style, ms=4, label=key.replace("_loss", " (eval)"))
    ax.set_yscale("log")  # the early drop and the late crawl both stay visible
    ax.yaxis.set_major_formatter(plt.ScalarFormatter())
    ax.yaxis.set_minor_formatter(plt.ScalarFormatter())
    ax.set(xlabel="tokens seen", ylabel="loss (nats/token)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(plt, fig, png_path)


# ---- Experiments: scaling laws, Chinchilla's iso-FLOP method -------------------------------------
# At each compute budget C, train models of several sizes N for D = C / flops_per_token tokens each; the
# loss is a valley in log N whose bottom N* is the best size for that budget. How N* and D* grow with C
# are the scaling exponents a and b.

def matmul_params(cfg):
    """N as scaling laws count it: the weights a token is multiplied by in the forward pass, i.e. every
    Linear weight of the blocks plus the output layer. Lookups (wte, wpe), biases and norms cost ~0 FLOPs."""
    d, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    attention = d * (cfg.n_head + 2 * cfg.kv_heads()) * hd + d * d  # qkv and the output projection
    mlp = 3 * d * (8 * d // 3) if cfg.mlp == "swiglu" else 2 * d * 4 * d  # fc and proj
    return cfg.n_layer * (attention + mlp) + d * cfg.vocab_size  # + lm_head


def flops_per_token(cfg):
    """Training FLOPs per token, C = 6·N·D plus attention: a forward pass costs 2 FLOPs (multiply, add)
    per weight, and per layer 2·T·d for q·kᵀ and 2·T·d for p·v over a full context T (as Chinchilla
    counts; a causal kernel could skip half); backward costs twice the forward, hence 6 and 12."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def fit_line(x, y):
    """Least-squares slope and intercept of y = slope·x + intercept."""
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    return slope.item(), (y.mean() - slope * x.mean()).item()


def parabola_minimum(log_n, loss):
    """Vertex of the least-squares parabola loss = a·u² + b·u + c, u = log N: (log N*, loss at N*).
    With fewer than 3 points (any parabola fits two), or points that do not curve upwards, the best
    measured point."""
    if len(loss) >= 3:
        u = torch.tensor(log_n, dtype=torch.float64)
        a, b, c = torch.linalg.lstsq(torch.stack([u * u, u, torch.ones_like(u)], 1),
                                     torch.tensor(loss, dtype=torch.float64)[:, None]).solution[:, 0].tolist()
        if a > 0:
            u_star = -b / (2 * a)
            return u_star, a * u_star ** 2 + b * u_star + c
    best = min(range(len(loss)), key=loss.__getitem__)
    return log_n[best], loss[best]


def fit_scaling_law(runs):
    """runs: dicts with flops (the budget), n (matmul_params), tokens, val_loss. For each budget the optimal
    N* (parabola in log N) and the tokens D* a model of that size trains on within the budget (log D is a
    line in log N at a fixed budget); then N* ∝ C^a, D* ∝ C^b and the loss frontier L* ∝ C^-alpha, each
    a straight line in log-log."""
    optima = []
    for budget in sorted({r["flops"] for r in runs}):
        same = [r for r in runs if r["flops"] == budget]
        log_n = [math.log(r["n"]) for r in same]
        log_n_star, loss_star = parabola_minimum(log_n, [r["val_loss"] for r in same])
        slope, intercept = fit_line(log_n, [math.log(r["tokens"]) for r in same])
        optima.append(dict(flops=budget, n_star=math.exp(log_n_star), d_star=math.exp(slope * log_n_star + intercept),
                           loss_star=loss_star))
    log_c = [math.log(o["flops"]) for o in optima]
    a = fit_line(log_c, [math.log(o["n_star"]) for o in optima])[0]
    b = fit_line(log_c, [math.log(o["d_star"]) for o in optima])[0]
    alpha = -fit_line(log_c, [math.log(o["loss_star"]) for o in optima])[0]
    return optima, a, b, alpha


def quiet_run(cfg, m, steps, run_dir):
    """One run of an experiment, its log unprinted: (its last evaluation's log.csv row, seconds taken)."""
    run_cfg = dataclasses.replace(cfg, out_dir=run_dir, plot=False, max_new_tokens=0,
                                  max_iters=steps, eval_interval=steps, log_interval=steps,
                                  overwrite=True)  # a run missing from the experiment's CSV never finished: anew
    t0 = time.perf_counter()
    with redirect_stdout(io.StringIO()):  # an experiment prints one row per run, not each run's log
        train(run_cfg, m)
    last_eval = [r for r in read_csv(os.path.join(run_dir, "log.csv")) if r["val_loss"] is not None][-1]
    if last_eval["step"] != steps:  # Ctrl-C or SIGTERM stopped the run early: it must not count as done
        raise KeyboardInterrupt
    return last_eval, round(time.perf_counter() - t0, 1)


def sweep_run(cfg, m, budget, run_dir):
    """One point of the sweep: model m trained for `budget` FLOPs; returns its sweep.csv row."""
    steps = max(1, round(budget / (cfg.batch_size * m.block_size * cfg.grad_accum * flops_per_token(m))))
    last_eval, seconds = quiet_run(dataclasses.replace(cfg, warmup_iters=min(cfg.warmup_iters, steps // 10)),
                                   m, steps, run_dir)
    return dict(flops=budget, width=m.n_embd, n=matmul_params(m), params=sum(p.numel() for p in GPT(m).parameters()),
                steps=steps, tokens=last_eval["tokens"], val_loss=last_eval["val_loss"], seconds=seconds)


def experiment_vocab_size(cfg):
    """The vocabulary size each run of an experiment will get from its tokenizer."""
    files = input_files(cfg.input)
    return len(build_tokenizer(files, validation_cut(files), cfg, log=lambda line: None).vocab)


def scaling_sweep(cfg, model_cfg, lab):
    """Every width at every budget; one CSV row per run in <out-dir>/sweep.csv (finished runs are skipped,
    so an interrupted sweep continues), then the fit and sweep.png."""
    budgets = [float(b) for b in lab.sweep_budgets.split(",")]
    widths = [int(w) for w in lab.sweep_widths.split(",")]
    step = model_cfg.n_head * (2 if model_cfg.rope else 1)  # each head the same size (even, to rotate pairs)
    if any(w % step for w in widths):
        raise ValueError(f"--sweep-widths {next(w for w in widths if w % step)} does not split into --n-head "
                         f"{model_cfg.n_head} heads{' of even size (--rope)' if model_cfg.rope else ''}: give widths "
                         f"divisible by {step}")
    vocab_size = experiment_vocab_size(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    csv_path = os.path.join(cfg.out_dir, "sweep.csv")
    columns = ["flops", "width", "n", "params", "steps", "tokens", "val_loss", "seconds"]
    runs = read_csv(csv_path) if os.path.exists(csv_path) else []
    if not runs:
        with open(csv_path, "w", encoding="utf-8") as f:
            f.write(",".join(columns) + "\n")
    print(f"{'budget':>8} {'width':>5} {'N (matmul)':>10} {'steps':>6} {'tokens':>10} {'tok/N':>6} {'val loss':>8} {'time':>6}")
    t0 = time.perf_counter()
    for budget in budgets:
        for width in widths:
            done = [r for r in runs if r["flops"] == budget and r["width"] == width]
            if done:
                r = done[0]
            else:
                m = dataclasses.replace(model_cfg, n_embd=width, vocab_size=vocab_size)
                r = sweep_run(cfg, m, budget, os.path.join(cfg.out_dir, f"run-{budget:.0e}-{width}"))
                runs.append(r)
                with open(csv_path, "a", encoding="utf-8") as f:
                    f.write(",".join(format_cell(r[c]) for c in columns) + "\n")
            print(f"{budget:8.0e} {width:5d} {r['n']:10,.0f} {r['steps']:6.0f} {r['tokens']:10,.0f} "
                  f"{r['tokens'] / r['n']:6.1f} {r['val_loss']:8.4f} {r['seconds']:5.0f}s", flush=True)
    print(f"sweep: {len(budgets) * len(widths)} runs, {time.perf_counter() - t0:.0f} s this time")
    runs = [r for r in runs if r["flops"] in budgets and r["width"] in widths]
    optima, a, b, alpha = fit_scaling_law(runs)
    edges = 0  # an optimum at or beyond the smallest or largest size tried: the valley's floor was not seen
    for o in optima:
        sizes = [r["n"] for r in runs if r["flops"] == o["flops"]]
        edge = not min(sizes) < o["n_star"] < max(sizes)
        edges += edge
        print(f"C = {o['flops']:.0e}: N* = {o['n_star']:,.0f}, D* = {o['d_star']:,.0f} tokens "
              f"({o['d_star'] / o['n_star']:.1f} tokens per parameter), loss {o['loss_star']:.4f}" +
              " (at the edge of the widths tried: widen --sweep-widths to see the valley's floor)" * edge)
    if len(optima) > 1:
        print(f"N* ∝ C^{a:.2f}, D* ∝ C^{b:.2f} (Chinchilla: 0.50, 0.50); loss frontier L* ∝ C^-{alpha:.3f}" +
              f" (unreliable: {edges} of the {len(optima)} optima lie at the edge)" * bool(edges))
    else:
        print("one budget: no exponent to fit; give two or more --sweep-budgets for how N* and D* grow with C")
    plot_sweep(runs, optima, os.path.join(cfg.out_dir, "sweep.png"))
    print(f"saved {csv_path} and {os.path.join(cfg.out_dir, 'sweep.png')}")
    return optima, a, b, alpha


def plot_sweep(runs, optima, png_path):
    """sweep.png: loss against N, one valley per budget, its bottom N* marked."""
    plt, fig, ax = new_figure()
    for o in optima:
        same = sorted((r for r in runs if r["flops"] == o["flops"]), key=lambda r: r["n"])
        line, = ax.plot([r["n"] for r in same], [r["val_loss"] for r in same], "o-", label=f"C = {o['flops']:.0e} FLOPs")
        ax.plot([o["n_star"]], [o["loss_star"]], "*", ms=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set(xlabel="N (matmul parameters)", ylabel="val loss (nats/token)", title="iso-FLOP curves; ★ = optimal size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(plt, fig, png_path)


# ---- Experiments: what the embeddings learned (--embeddings) -------------------------------------
# Tokens used alike get similar vectors (with weight tying, wte is also the output layer, so tokens that are
# predicted in the same places are pulled together too).

def cosine_neighbours(emb, ids, k=5):
    """For each id, the k other rows of emb (V, C) with the highest cosine similarity: [(id, cos), ...]."""
    unit = F.normalize(emb.float(), dim=1)
    sims = unit[ids] @ unit.T  # (len(ids), V)
    sims[torch.arange(len(ids)), torch.tensor(ids)] = -2.0  # not itself
    best = sims.topk(min(k, emb.size(0) - 1), dim=1)
    return [list(zip(i.tolist(), s.tolist())) for i, s in zip(best.indices, best.values)]


def group_similarity(emb, groups):
    """Mean cosine similarity within each group of ids and between it and the other groups' ids."""
    unit = F.normalize(emb.float(), dim=1)
    sims = unit @ unit.T
    result = {}
    for name, ids in groups.items():
        others = [i for other, o in groups.items() if other != name for i in o]
        within = sims[ids][:, ids]
        n = len(ids)
        result[name] = ((within.sum() - within.diagonal().sum()) / (n * (n - 1))).item(), sims[ids][:, others].mean().item()
    return result


def char_groups(chars):
    """The groups a char model's embeddings are tested for: letters by case and by vowel, digits, punctuation."""
    have = lambda s: [chars.index(c) for c in s if c in chars]  # noqa: E731
    groups = {"vowels": have("aeiou"), "consonants": have("bcdfghjklmnpqrstvwxyz"),
              "uppercase": have("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), "digits": have("0123456789"),
              "punctuation": have("!\"&'(),-.:;?[]")}
    return {name: ids for name, ids in groups.items() if len(ids) >= 2}


def case_twin_similarity(emb, chars):
    """Mean cosine of each lowercase letter with its uppercase twin, and with the other uppercase letters;
    None with fewer than two such pairs."""
    unit = F.normalize(emb.float(), dim=1)
    pairs = [(chars.index(c), chars.index(c.upper())) for c in "abcdefghijklmnopqrstuvwxyz" if c in chars and c.upper() in chars]
    if len(pairs) < 2:
        return None
    upper = [u for _, u in pairs]
    twin = sum((unit[lo] @ unit[up]).item() for lo, up in pairs) / len(pairs)
    other = sum((unit[lo] @ unit[u]).item() for lo, up in pairs for u in upper if u != up) / (len(pairs) * (len(pairs) - 1))
    return twin, other


def show_embeddings(cfg):
    """Nearest neighbours of a few tokens, the char groups trained vs untrained, and embeddings.png; for any
    vocabulary, saying what it leaves out."""
    ckpt, model = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), "cpu")
    tokenizer = tokenizer_from_state(ckpt["tokenizer"])
    emb = model.wte.weight.detach()
    torch.manual_seed(cfg.seed)
    untrained = GPT(model.cfg).wte.weight.detach()  # same shape and init, no training: the baseline
    name = lambda i: repr(tokenizer.decode([i]))  # noqa: E731
    chars = getattr(tokenizer, "chars", None)  # a character vocabulary, or None for BPE
    if chars:
        probes = [chars.index(c) for c in "aeAE1.;\n" if c in chars] or list(range(min(8, len(chars))))
    else:
        probes = frequent_words(tokenizer, ckpt.get("train_config", {}).get("input", cfg.input), 8)
    for i, neighbours in zip(probes, cosine_neighbours(emb, probes)):
        print(f"{name(i):>10} -> " + ", ".join(f"{name(j)} {s:.2f}" for j, s in neighbours))
    groups = char_groups(chars) if chars else {}
    if len(groups) >= 2:  # within one group against between groups
        print(f"{'group':>12} {'trained: within / between':>26} {'untrained: within / between':>28}")
        trained, fresh = group_similarity(emb, groups), group_similarity(untrained, groups)
        for g in trained:
            print(f"{g:>12} {trained[g][0]:12.3f} / {trained[g][1]:.3f} {fresh[g][0]:15.3f} / {fresh[g][1]:.3f}")
    elif chars:
        print("fewer than two groups (vowels, consonants, capitals, digits, marks) in this vocabulary: no group table")
    twins = case_twin_similarity(emb, chars) if chars else None
    if twins:
        (twin, other), (twin0, other0) = twins, case_twin_similarity(untrained, chars)
        print(f"lowercase letter vs its uppercase twin: {twin:.3f} (other uppercase {other:.3f}); untrained {twin0:.3f} ({other0:.3f})")
    elif chars:
        print("fewer than two letters in both cases in this vocabulary: no case-twin comparison")
    png = os.path.join(cfg.out_dir, "embeddings.png")
    plot_embeddings(emb, [tokenizer.decode([i]) for i in range(emb.size(0))], png)
    print(f"saved {png}")


def frequent_words(tokenizer, input_spec, n):
    """The n most frequent tokens of the first MB of the model's training text that are whole words (a space
    and 3+ letters), the most frequent tokens of any kind after them; without the text, the last n merges."""
    text = ""
    try:
        for piece in (piece for doc in documents(input_files(input_spec)) for piece in doc):
            text += piece
            if len(text) >= 10**6:
                break
    except ValueError as err:
        print(f"note: cannot re-read the training text ({err}): the last {n} merges are shown instead")
        return list(range(len(tokenizer.vocab) - n, len(tokenizer.vocab)))
    counts = torch.bincount(torch.tensor(tokenizer.encode(text, allowed_special="all"), dtype=torch.long),
                            minlength=len(tokenizer.vocab))
    ranked = [i for i in counts.argsort(descending=True).tolist() if counts[i] > 0]
    is_word = lambda i: (lambda t: len(t) >= 4 and t[0] == " " and t[1:].isalpha())(tokenizer.decode([i]))  # noqa: E731
    return ([i for i in ranked if is_word(i)] + [i for i in ranked if not is_word(i)])[:n]


def plot_embeddings(emb, labels, png_path, max_labels=120):
    """embeddings.png: each token's vector projected on the two directions of largest variance (PCA)."""
    centred = emb.float() - emb.float().mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # rows of v: principal directions
    xy = centred @ v[:2].T  # (V, 2)
    plt, fig, ax = new_figure()
    ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.4)
    for i in range(min(len(labels), max_labels)):
        ax.annotate(repr(labels[i])[1:-1], xy[i].tolist(), fontsize=7)
    ax.set(xlabel="principal direction 1", ylabel="principal direction 2", title="token embeddings (PCA)")
    with warnings.catch_warnings():  # a character the font lacks (an emoji) is drawn as a box: no need to warn
        warnings.filterwarnings("ignore", "Glyph .* missing")
        save_figure(plt, fig, png_path)


# ---- Experiments: ablations, what each modern option buys, alone and together (--ablation) ---------
# Each row changes these settings of the run's own (GPT-2's with --preset gpt2). "depth" is meant for a
# deeper model (--n-layer 6): where the placement of the norm, the warmup and the residuals matter.
ABLATIONS = {
    "options": [("GPT-2", {}), ("muon", {"optimizer": "muon"}), ("rmsnorm", {"norm": "rmsnorm"}),
                ("relu2", {"mlp": "relu2"}), ("swiglu", {"mlp": "swiglu"}), ("qk-norm", {"qk_norm": True}),
                ("untied head", {"untied_head": True}), ("zero init", {"zero_init": True}),
                ("softcap 15", {"softcap": 15.0}), ("rope", {"rope": True}), ("bf16 autocast", {"dtype": "bfloat16"}),
                ("all: the cpu preset", {k: v for k, v in PRESETS["cpu"].items() if k != "max_iters"})],
    "depth": [("pre-LN", {}), ("pre-LN, no warmup", {"warmup_iters": 0}), ("post-LN", {"post_ln": True}),
              ("post-LN, no warmup", {"post_ln": True, "warmup_iters": 0}), ("pre-LN, no residual", {"residual": False})],
}


def with_settings(cfg, m, settings):
    """(run config, model config) with settings applied to whichever of the two has each field."""
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    return (dataclasses.replace(cfg, **{k: v for k, v in settings.items() if k not in model_fields}),
            dataclasses.replace(m, **{k: v for k, v in settings.items() if k in model_fields}))


def step_times(variants, rounds=9, steps=5):
    """Seconds per training step of each (cfg, m), on random tokens. The variants take turns, round after
    round, so a busy spell of the machine slows them all alike; each keeps its fastest round, the one
    least disturbed by other jobs."""
    timed = []
    for cfg, m in variants:
        torch.manual_seed(cfg.seed)
        model = GPT(m)
        optimizer = make_optimizer(model, cfg, "cpu")
        x, y = torch.randint(m.vocab_size, (2, cfg.batch_size, m.block_size))

        def step(model=model, optimizer=optimizer, x=x, y=y, clip=cfg.grad_clip or math.inf,
                 autocast=make_autocast("cpu", cfg.dtype)):
            with autocast:
                loss = model(x, y)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for part in optimizer:
                part.step()
                part.zero_grad(set_to_none=True)
        step()  # the first step allocates the optimizer's state
        timed.append((step, []))
    for _ in range(rounds):
        for step, times in timed:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t0) / steps)
    return [min(times) for _, times in timed]


def kept_step_times(rows, variants, path):
    """step_times of the rows, measured once and kept in path (JSON): a continued ablation reuses them, so
    its 'same time' runs keep their lengths. Rows new since then are timed beside the first row and
    scaled to its kept time: only the ratios matter."""
    keys = [f"{name}: {settings}" for name, settings in rows]
    kept = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
    missing = [i for i, key in enumerate(keys) if key not in kept]
    if missing:
        first, *measured = step_times([variants[0]] + [variants[i] for i in missing])
        scale = kept[keys[0]] / first if keys[0] in kept else 1.0
        kept.update({keys[i]: t * scale for i, t in zip(missing, measured)})
        with replaced_whole(path, "the step times", "w") as f:
            json.dump(kept, f, indent=1)
    return [kept[key] for key in keys]


def ablation(cfg, model_cfg, lab):
    """Every row of ABLATIONS[lab.ablation] for every seed, after the same steps (--max-iters) and after
    the same time (as many steps as the row takes in the time GPT-2 takes for --max-iters). One CSV row per
    run in <out-dir>/ablation.csv (finished runs are skipped: an interrupted ablation continues)."""
    rows, seeds = ABLATIONS[lab.ablation], [int(s) for s in lab.ablation_seeds.split(",")]
    m = dataclasses.replace(model_cfg, vocab_size=experiment_vocab_size(cfg))
    variants = [with_settings(cfg, m, settings) for _, settings in rows]
    os.makedirs(cfg.out_dir, exist_ok=True)
    timed = lab.ablation == "options"  # depth: every row costs the same, so only the same steps
    per_step = [math.nan] * len(rows)
    if timed:
        per_step = kept_step_times(rows, variants, os.path.join(cfg.out_dir, "step_times.json"))
    csv_path = os.path.join(cfg.out_dir, "ablation.csv")
    columns = ["row", "seed", "steps", "val_loss", "seconds"]
    done = read_csv(csv_path) if os.path.exists(csv_path) else []
    if not done:
        with open(csv_path, "w", encoding="utf-8") as f:
            f.write(",".join(columns) + "\n")
    same_time_header = f" {'steps':>6} {'val after the same time':>24}" if timed else ""
    print(f"{'':22} {'ms/step':>13} {'val after ' + str(cfg.max_iters) + ' steps':>22}{same_time_header}")
    for i, ((name, _), (run_cfg, m), seconds) in enumerate(zip(rows, variants, per_step)):
        same_time = max(1, round(cfg.max_iters * per_step[0] / seconds)) if seconds == seconds else cfg.max_iters
        if abs(same_time - cfg.max_iters) <= 0.03 * cfg.max_iters:
            same_time = cfg.max_iters  # within the timing's noise: one run answers both
        losses = {}
        for steps in dict.fromkeys([cfg.max_iters, same_time]):
            for seed in seeds:
                found = [r for r in done if (r["row"], r["seed"], r["steps"]) == (i, seed, steps)]
                if not found:
                    last, took = quiet_run(dataclasses.replace(run_cfg, seed=seed), m, steps,
                                           os.path.join(cfg.out_dir, f"run-{i}-{steps}-{seed}"))
                    found = [dict(row=i, seed=seed, steps=steps, val_loss=last["val_loss"], seconds=took)]
                    with open(csv_path, "a", encoding="utf-8") as f:
                        f.write(",".join(format_cell(found[0][c]) for c in columns) + "\n")
                losses.setdefault(steps, []).append(found[0]["val_loss"])
        timing, after_same_time = "-", ""  # depth: no timing, the same steps only
        if seconds == seconds:
            timing = f"{1000 * seconds:6.1f} ({seconds / per_step[0]:4.2f}x)"
            after_same_time = f"{same_time:6d} {mean_spread(losses[same_time]):>24}"
        print(f"{name:22} {timing:>13} {mean_spread(losses[cfg.max_iters]):>22} {after_same_time}".rstrip(), flush=True)


def mean_spread(values):
    """'mean ± standard deviation' of the seeds' results."""
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.4f} ± {t.std() if len(values) > 1 else 0:.4f}"


# ---- Looking inside, 1: attention from the ground up (--explain-attention) ------------------------------
# What it teaches: attention_math's formula built the way a learner builds it, in steps small enough to check
# by hand: a running average (a loop, a matrix, a softmax over a -inf mask), weights from dot products,
# trainable queries, keys and values, the √d_k scale, the causal mask and dropout, several heads, until it
# is CausalSelfAttention. walk() prints each step's code, runs it, and prints what it returns.

TOY = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0], [-1.0, 6.0]])  # (T, C) = (4, 2): averages by hand
# "Your journey starts with one step": each token a forged 3-d vector (S. Raschka, "Build a Large Language
# Model (From Scratch)", ch. 3), so that every number can be checked by hand
JOURNEY = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                        [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])  # (T, C) = (6, 3)


def average_by_loop(x):
    """The lecture's trick: each position becomes the mean of itself and the positions before it. A loop:"""
    xbow = torch.stack([x[:t + 1].mean(dim=0) for t in range(len(x))])  # (T, C)
    return dict(xbow=xbow)


def average_by_matrix(x):
    """The same as one product with a lower-triangular matrix, whose row t holds 1/(t+1) t+1 times:"""
    wei = torch.ones(len(x), len(x)).tril()
    wei = wei / wei.sum(dim=1, keepdim=True)  # (T, T): each row sums to 1
    return dict(wei=wei, xbow=wei @ x)  # (T, T) @ (T, C) -> (T, C)


def average_by_softmax(x):
    """The same as a softmax over scores that are 0 where a position may look and -inf in its future.
    Attention keeps this form, and lets the scores depend on the tokens:"""
    future = torch.ones(len(x), len(x), dtype=torch.bool).triu(1)  # (T, T): True above the diagonal
    wei = torch.zeros(len(x), len(x)).masked_fill(future, float("-inf")).softmax(dim=-1)  # exp(-inf) = 0
    return dict(wei=wei, xbow=wei @ x)


def attention_of_journey(inputs):
    """Self-attention without trainable weights: "journey" scores each token by a dot product (how alike the
    two vectors are), the softmax makes the scores weights, and its new vector is the weighted mean:"""
    query = inputs[1]  # (C,): "journey"
    scores = inputs @ query  # (T,): one dot product per token
    weights = scores.softmax(dim=0)  # (T,): positive, summing to 1
    return dict(scores=scores, weights=weights, context=weights @ inputs)  # (C,)


def attention_of_all(inputs):
    """All six at once: the dot products are one matrix product, the softmax runs along each row:"""
    scores = inputs @ inputs.T  # (T, T): row i scores every token for token i
    weights = scores.softmax(dim=-1)  # (T, T)
    return dict(weights=weights, contexts=weights @ inputs)  # (T, C): row 1 is journey's context again


def queries_keys_values(inputs, d_k=2, seed=123):
    """Trainable weights: three matrices give each token a query (what it looks for), a key (what it offers)
    and a value (what it passes on); random here, learned by gradient descent in a model:"""
    g = torch.Generator().manual_seed(seed)
    W_q, W_k, W_v = (torch.rand(inputs.size(1), d_k, generator=g) for _ in range(3))  # (C, d_k) each
    queries, keys, values = inputs @ W_q, inputs @ W_k, inputs @ W_v  # (T, d_k) each
    return dict(queries=queries, keys=keys, values=values, scores=queries @ keys.T)  # (T, T): query i, key j


def why_divide_by_sqrt_dk(d_k=64, seed=0):
    """Why the scores are divided by √d_k: a dot product of d_k numbers of variance 1 has variance d_k, so at a
    real head size the softmax is nearly one-hot and its gradient nearly 0: the head cannot learn where to
    look. Divided by √d_k the scores have variance 1 again. 1000 random queries, 16 keys each:"""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1000, d_k, generator=g) @ torch.randn(16, d_k, generator=g).T  # (1000, 16)
    scaled = scores / math.sqrt(d_k)
    return dict(score_std=scores.std(), largest_weight=scores.softmax(dim=-1).amax(dim=-1).mean(),
                scaled_std=scaled.std(), largest_weight_scaled=scaled.softmax(dim=-1).amax(dim=-1).mean())


def causal_mask(scores, values, d_k=2, p=0.5, seed=123):
    """The causal mask: a token may not look at the tokens after it, which it learns to predict: -inf before the
    softmax, or the same, zero the future after it and renormalise each row. While training, dropout zeroes
    each weight with probability p and scales the rest by 1/(1-p) (attention_math's F.dropout):"""
    scores = scores / math.sqrt(d_k)  # step 7
    future = torch.ones(len(scores), len(scores), dtype=torch.bool).triu(1)  # (T, T)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    after = scores.softmax(dim=-1).masked_fill(future, 0.0)
    after = after / after.sum(dim=-1, keepdim=True)
    torch.manual_seed(seed)  # F.dropout draws from the global generator
    return dict(weights=weights, max_difference=(weights - after).abs().max(), contexts=weights @ values,
                dropped=F.dropout(weights, p, training=True))


def several_heads(x, attn):
    """Several heads side by side, each with its own rows of the query, key and value matrices (here those of a
    CausalSelfAttention, attn); their outputs concatenated, then mixed by one projection:"""
    B, T, C = x.shape
    hd = C // attn.n_head  # each head's width
    (W_q, W_k, W_v), (b_q, b_k, b_v) = attn.qkv.weight.split(C), attn.qkv.bias.split(C)  # (C, C), (C,) each
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for h in range(attn.n_head):
        rows = slice(h * hd, (h + 1) * hd)
        q, k, v = (x @ W[rows].T + b[rows] for W, b in ((W_q, b_q), (W_k, b_k), (W_v, b_v)))  # (B, T, hd) each
        weights = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(future, float("-inf")).softmax(dim=-1)
        heads.append(weights @ v)  # (B, T, hd)
    return dict(y=attn.proj(torch.cat(heads, dim=-1)))  # (B, T, C)


def one_matrix_for_all_heads(x, attn, y):
    """CausalSelfAttention does all heads at once: one matrix makes every head's q, k and v, and one call
    attends with them all, by the formula (attention_math) or the fused kernel (SDPA). Both give the heads'
    y, to float32's rounding:"""
    differences = {}
    for name in ("math", "sdpa"):
        attn.attend = pick_attention(name)
        differences[f"{name}_vs_heads"] = (attn(x) - y).abs().max()
    return differences


def show(value):
    """A tensor as a reader checks it by hand: to 4 decimals, a matrix one row per line."""
    if value.dim() == 0:
        return f"{value.item():.4g}"
    rows = value.reshape(-1, value.size(-1)).tolist()  # (1, T, C): one sequence's rows
    return "\n".join("[" + ", ".join(f"{v:7.4f}" for v in row) + "]" for row in rows)


def walk(number, step, *args):
    """Print what a step does and its code, run it, print what it returns."""
    print("\n" + textwrap.fill(f"{number}. " + " ".join(step.__doc__.split()), 110))
    print(textwrap.indent(textwrap.dedent(inspect.getsource(step).split('"""')[2]).strip("\n"), "    "))
    results = step(*args)
    for name, value in results.items():
        shown = show(value)
        print(f"  -> {name} =" + (textwrap.indent("\n" + shown, "     ") if "\n" in shown else " " + shown))
    return results


def explain_attention(seed=1337):
    """--explain-attention: the walk-through. Returns each step's results, for the tests."""
    print(f"Attention from the ground up: each step's code, then what it computes.\n\nx = {TOY.tolist()}")
    r = {}
    for number, step in enumerate((average_by_loop, average_by_matrix, average_by_softmax), 1):
        r[step.__name__] = walk(number, step, TOY)
    r["agree"] = max((r[name]["xbow"] - r["average_by_loop"]["xbow"]).abs().max() for name in r)
    print(f"\nthe loop, the matrix and the softmax agree: largest difference {r['agree']:.1g}")
    words = "Your journey starts with one step".split()
    inputs = ", ".join(f"{word} {[round(v, 2) for v in row]}" for word, row in zip(words, JOURNEY.tolist()))
    print("\n" + textwrap.fill(f"inputs: {inputs}", 110))
    r["journey"] = walk(4, attention_of_journey, JOURNEY)
    r["all"] = walk(5, attention_of_all, JOURNEY)
    r["qkv"] = walk(6, queries_keys_values, JOURNEY)
    r["scale"] = walk(7, why_divide_by_sqrt_dk)
    r["causal"] = walk(8, causal_mask, r["qkv"]["scores"], r["qkv"]["values"])
    torch.manual_seed(seed)
    attn = CausalSelfAttention(GPTConfig(n_embd=8, n_head=4, block_size=len(JOURNEY)))
    with torch.no_grad():
        attn.qkv.bias.normal_(0.0, 0.02)  # not zero, so that the comparison covers the biases too
        x = torch.randn(1, len(JOURNEY), 8)  # (B, T, C)
        print(f"\nx: random, {tuple(x.shape)}; attn = CausalSelfAttention(GPTConfig(n_embd=8, n_head=4))")
        r["heads"] = walk(9, several_heads, x, attn)
        r["fused"] = walk(10, one_matrix_for_all_heads, x, attn, r["heads"]["y"])
    return r


# ---- Looking inside, 2: a checkpoint measured on any text (--evaluate FILE) ------------------------------
# What it teaches: how good a model is, in the units models are compared in: nats per token (the training
# loss), bits per character and per byte (comparable across tokenizers) and perplexity (e^loss: as unsure as a
# choice among that many tokens), beside a model that knows nothing (ln V: every token equally likely).
# Every token after a document's first is predicted once, from up to block_size tokens before it: windows
# of block_size tokens slide by half a block, and each scores only the tokens that no window scored before
# (its last half), so a token sees from half a block to a block of context (fewer in a document's first half
# block), at two forward passes per token. Training's val loss averages every position of random windows,
# the first ones with almost no context, so it is a little higher: the loss by length of context shows why.

def sliding_windows(n_tokens, block_size, stride):
    """[(start, first)] over a document of n_tokens >= 2 tokens: a window's inputs are tokens start ..
    start+block-1, its targets the token after each, and it scores them from its position first on."""
    last = max(0, n_tokens - 1 - block_size)  # the last window ends at the last target
    windows, scored = [], 0  # scored: targets 1 .. scored are done
    for start in [*range(0, last, stride), last]:
        windows.append((start, scored - start))
        scored = start + block_size
    return windows


@contextmanager
def recorded_attention(model, keep=lambda weights: weights):
    """Every attention layer computes its weights explicitly, (B, nh, T, L) by attention_weights, and appends
    keep(weights) to the list this yields (what is kept of them: a large model's maps, all layers' at once,
    would not fit in memory); the model's output is the same."""
    maps = []

    def attend_and_record(q, k, v, dropout_p=0.0):
        weights = attention_weights(q, k)  # (B, nh, T, L)
        maps.append(keep(weights.float()))
        return weights @ v.repeat_interleave(q.size(1) // v.size(1), dim=1)  # (B, nh, T, hd)

    for block in model.blocks:
        block.attn.attend = attend_and_record
    try:
        yield maps
    finally:
        for block in model.blocks:
            block.attn.attend = pick_attention(model.cfg.attention)


def attention_measures(weights, newline):
    """What a head does at each query t, from its weights (..., T, T) and newline (..., T) (the token ends a line):
    (..., T, 4): the distance it looks back (sum over s of w(t, s)·(t - s)), its weight on the previous token,
    on the start of t's line (where that is neither t nor t-1, not to count them twice), and on t itself."""
    T = weights.size(-1)
    t = torch.arange(T, device=weights.device)
    distance = (weights * (t[:, None] - t).clamp(min=0)).sum(dim=-1)  # (..., T)
    previous = F.pad(weights[..., t[1:], t[1:] - 1], (1, 0), value=math.nan)  # (..., T): none for t = 0
    line_start = F.pad(torch.where(newline, t + 1, 0)[..., :-1].cummax(dim=-1).values, (1, 0))  # (..., T)
    line_start = line_start.expand(weights.shape[:-1])
    on_start = weights.gather(-1, line_start[..., None])[..., 0].masked_fill(line_start >= t - 1, math.nan)
    return torch.stack([distance, previous, on_start, weights.diagonal(dim1=-2, dim2=-1)], dim=-1)


def windows_per_batch(cfg, most=32, floats=2**26):
    """How many windows to score at once: up to 32, as long as the logits (B, T, V) and one layer's attention
    weights (B, nh, T, T) stay under 2^26 floats (256 MB) each. GPT-2 at a block of 1,024: one window."""
    return max(1, min(most, floats // (cfg.block_size * cfg.vocab_size), floats // (cfg.n_head * cfg.block_size ** 2)))


@torch.inference_mode()
def score_document(model, ids, newline, tally, report=lambda tokens: None):
    """The loss of every token after the first (sliding_windows, a stride of half a block), a batch of windows
    at a time; what the heads do on the rows scored, and the loss at each position of the windows, are added
    to tally."""
    block, device = model.cfg.block_size, model.wte.weight.device
    T, data, losses = min(block, len(ids) - 1), torch.tensor(ids), torch.empty(len(ids) - 1)
    windows, per_batch = sliding_windows(len(ids), block, max(1, block // 2)), windows_per_batch(model.cfg)
    for i in range(0, len(windows), per_batch):
        batch = windows[i:i + per_batch]
        x, y = (torch.stack([data[s + j:s + j + T] for s, _ in batch]).to(device) for j in (0, 1))  # (B, T) each
        unscored = torch.arange(T, device=device) < torch.tensor([first for _, first in batch], device=device)[:, None]
        line_ends = newline[x][:, None]  # (B, 1, T): once per batch, not per layer

        def measured(weights):  # (B, nh, T, T) -> the sums and counts of the four measures on the rows scored
            m = attention_measures(weights, line_ends).masked_fill(unscored[:, None, :, None], math.nan)
            return m.nansum(dim=(0, 2)).cpu(), m.isnan().logical_not().sum(dim=(0, 2)).cpu()  # (nh, 4) each

        with recorded_attention(model, measured) as measures:
            logits, _ = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(len(batch), T)
        for row, (start, first) in enumerate(batch):
            losses[start + first:start + T] = loss[row, first:].cpu()
        tally["position_sum"][:T] += loss.sum(dim=0).cpu()
        tally["position_rows"][:T] += len(batch)
        for layer, (sums, rows) in enumerate(measures):
            tally["head_sum"][layer] += sums
            tally["head_rows"][layer] += rows
        report(sum(T - first for _, first in batch))  # tokens scored
    return losses


def evaluate(model, tokenizer, spec):
    """Every document of spec (a file, a directory or a glob, as --input takes) scored: [(name, text, ids,
    losses)], and the tally of what the windows showed. A character the model cannot encode is a one-line error."""
    model.eval()
    m = model.cfg
    newline = torch.tensor(["\n" in tokenizer.decode([i]) for i in range(m.vocab_size)], device=model.wte.weight.device)
    tally = dict(head_sum=torch.zeros(m.n_layer, m.n_head, 4), head_rows=torch.zeros(m.n_layer, m.n_head, 4),
                 position_sum=torch.zeros(m.block_size), position_rows=torch.zeros(m.block_size))
    scored, done, start, shown = [], 0, time.perf_counter(), time.perf_counter()

    def report(tokens):  # a long evaluation (GPT-2 scores a few hundred tokens a second here) says how far it is
        nonlocal done, shown
        done += tokens
        if time.perf_counter() - shown >= 5.0:
            shown = time.perf_counter()
            print(f"evaluating: {done:,} tokens scored, {done / (shown - start):,.0f} tokens/s", flush=True)

    for path in input_files(spec, "--evaluate"):
        for number, pieces in enumerate(documents([path]), 1):
            name, text = f"{path} #{number}" if path.endswith(".jsonl") else path, "".join(pieces)
            try:
                ids = tokenizer.encode(text, allowed_special="all")
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            if len(ids) > 1:
                scored.append((name, text, ids, score_document(model, ids, newline, tally, report)))
    if not scored:
        raise ValueError(f"{spec}: no document holds two tokens, so there is nothing to predict")
    return scored, tally


def character_losses(text, ids, losses, tokenizer):
    """(len(text),): each character's loss in nats, nan for the first token's (nothing predicts it). A token's
    loss is shared equally by its bytes, and a character gets its bytes' shares: so a passage's losses add up
    to its tokens', even where a BPE token holds half a character."""
    pieces = [tokenizer.vocab[i] for i in ids]  # a char vocab holds characters, a BPE vocab bytes
    sizes = torch.tensor([len(p if isinstance(p, bytes) else p.encode("utf-8")) for p in pieces])  # (N,)
    per_byte = torch.repeat_interleave(torch.cat([torch.tensor([math.nan]), losses]) / sizes, sizes)  # (bytes,)
    char_bytes = torch.tensor([len(c.encode("utf-8")) for c in text])  # (len(text),)
    char_of_byte = torch.repeat_interleave(torch.arange(len(text)), char_bytes)  # (bytes,)
    return torch.zeros(len(text)).index_add_(0, char_of_byte, per_byte)


def print_losses(scored, char_losses, vocab_size):
    """Per document (up to 20) and in total: nats per token, bits per character and per byte, perplexity; and
    the uniform baseline, ln V."""
    def row(name, nats, tokens, chars, n_bytes):
        bits = nats / math.log(2)
        print(f"{name[-40:]:<40} {tokens:>10,} {nats / tokens:>10.4f} {bits / chars:>10.4f} {bits / n_bytes:>10.4f} "
              f"{math.exp(nats / tokens):>10.2f}")
    print(f"{'document':<40} {'tokens':>10} {'nats/token':>10} {'bits/char':>10} {'bits/byte':>10} {'perplexity':>10}")
    total = [0.0, 0, 0, 0]
    for (name, text, ids, losses), char_loss in zip(scored, char_losses):
        first = int(char_loss.isnan().sum())  # the first token's characters
        counts = [losses.sum().item(), len(losses), len(text) - first, len(text.encode()) - len(text[:first].encode())]
        if len(scored) <= 20:
            row(name, *counts)
        total = [a + b for a, b in zip(total, counts)]
    row(f"total ({len(scored)} document{'s' * (len(scored) != 1)})", *total)
    row(f"uniform over {vocab_size} tokens (ln V)", math.log(vocab_size) * total[1], *total[1:])


# ---- Looking inside, 3: where the model is surprised -----------------------------------------------------
# What it teaches: which characters carry the loss. A passage is shown with each character shaded by its loss,
# and the characters grouped by context (the first letter of a word against the rest, a speaker's name
# against the lines spoken), each group's mean loss measured.

LOSS_EDGES = (0.5, 1.0, 2.0, 3.0, 5.0)  # nats: the model gave the character e^-0.5 = 61 % ... e^-5 < 1 %
SHADES = (None, 230, 222, 215, 209, 196)  # ANSI 256-colour backgrounds, pale yellow to red


def shaded(text, bucket):
    """text on the background colour of a loss bucket (ANSI escape codes); bucket 0 as it is."""
    return f"\x1b[48;5;{SHADES[bucket]}m\x1b[38;5;16m{text}\x1b[0m" if bucket else text


def print_surprise(text, char_loss, colour, position, lines=14):
    """The text from position on, each character shaded by its loss: on a terminal by colour; in a pipe, under
    each line a line of digits, each the loss bucket of the character above it (blank: below 0.5 nats)."""
    ranges = [f"< {LOSS_EDGES[0]}", *(f"{a}-{b}" for a, b in zip(LOSS_EDGES, LOSS_EDGES[1:])), f">= {LOSS_EDGES[-1]}"]
    if colour:
        print("\nwhere the model is surprised, in nats: " + " ".join(shaded(f" {r} ", b) for b, r in enumerate(ranges)))
    else:
        print("\nwhere the model is surprised (under each character its loss in nats: " +
              ", ".join(f"{b or 'blank'}: {r}" for b, r in enumerate(ranges)) + "; ↵ is the newline):")
    for line in text[position:].split("\n")[:lines]:
        losses = char_loss[position:position + len(line) + 1].tolist()  # its characters' and its newline's
        buckets = [sum(v >= edge for edge in LOSS_EDGES) for v in losses]  # nan: 0
        if colour:
            print("".join(map(shaded, line + "↵", buckets)))
        else:
            print(line + "↵" + ("\n" + "".join(str(b) if b else " " for b in buckets)).rstrip())
        position += len(line) + 1


def char_contexts(text):
    """Groups of the text's characters, {name: (len(text),) bool}. A speaker's name is a line ending in ':'
    after a blank line (or at the start), as in input.txt."""
    before = "\n" + text[:-1]  # the character before each
    letter, after_letter = (torch.tensor([c.isalpha() for c in s]) for s in (text, before))
    name, newline = torch.zeros(len(text), dtype=torch.bool), torch.tensor([c == "\n" for c in text])
    for match in re.finditer(r"(?:\A|(?<=\n\n))[^\n]+:(?=\n)", text):
        name[match.start():match.end()] = True
    return {"first letter of a word": letter & ~after_letter, "rest of a word": letter & after_letter,
            "speaker's name (NAME: line)": name, "the lines spoken (other lines)": ~name & ~newline,
            "first letter of a name": name & torch.tensor([b == "\n" for b in before]),
            "end of a line (newline)": newline, "after . , ; : ! ?": torch.tensor([b in ".,;:!?" for b in before])}


def print_contexts(texts, char_losses):
    """Each group's characters, mean loss (nats and bits) and share of all the loss, hardest first."""
    groups, total = {}, sum(loss.nansum().item() for loss in char_losses)
    for text, loss in zip(texts, char_losses):
        for name, mask in char_contexts(text).items():
            mask &= ~loss.isnan()
            n, s = groups.get(name, (0, 0.0))
            groups[name] = n + mask.sum().item(), s + loss[mask].sum().item()
    print(f"\n{'context (hardest first)':<32} {'characters':>10} {'nats':>7} {'bits':>6} {'share of the loss':>18}")
    for name, (n, s) in sorted(groups.items(), key=lambda group: -group[1][1] / max(group[1][0], 1)):
        mean = s / max(n, 1)
        print(f"{name:<32} {n:>10,} {mean:>7.3f} {mean / math.log(2):>6.2f} {s / total:>17.1%}")


# ---- Looking inside, 4: what the heads do, and whether the model learns in context ----------------------
# What it teaches: where each head looks: on a prompt (attention.png), and over the evaluated text as four
# numbers (attention_measures). Then Olsson et al. (2022), "In-context learning and induction heads":
# random tokens, repeated. The first copy cannot be predicted; the second can, by a model that finds the
# earlier occurrence of the current token and copies the token that followed it. A head that does so, an
# induction head, attends from each token of the second copy to that follower. The paper finds that it takes
# two layers: a head that notes at each position the token before it, and a later one that looks for it.

def induction_scores(weights, n):
    """weights (..., 2n, 2n) on a sequence whose second half repeats its first -> (...,): each head's mean
    weight, over the second copy, on the token after the same token's first occurrence (t - n + 1)."""
    t = torch.arange(n, 2 * n, device=weights.device)
    return weights[..., t, t - n + 1].mean(dim=-1)


@torch.inference_mode()
def repeated_tokens_test(model, n=None, sequences=None, seed=0):
    """Random sequences of n tokens, each repeated once within a block -> the mean loss on the first copy and
    on the second (without their first tokens, which nothing predicts), and each head's induction score
    (n_layer, nh). Sequences: 4,096 tokens' worth, at least 4 (32 of 64 for a block of 128, 4 for GPT-2's)."""
    model.eval()
    n = n or model.cfg.block_size // 2
    sequences = sequences or max(4, 4096 // (2 * n))
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(model.cfg.vocab_size, (sequences, n), generator=g)  # (S, n)
    x = torch.cat([first, first], dim=1).to(model.wte.weight.device)  # (S, 2n)
    losses, induction = [], 0
    for batch in x.split(windows_per_batch(model.cfg)):
        with recorded_attention(model, lambda weights: induction_scores(weights, n).sum(dim=0)) as scores:
            logits, _ = model(batch)  # (B, 2n, V): position t predicts token t+1
        losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"))
        induction = induction + torch.stack(scores).cpu()  # (n_layer, nh): summed over the sequences
    loss = torch.cat(losses).view(sequences, 2 * n - 1)  # [:, j]: the loss of token j+1
    return dict(first_copy=loss[:, :n - 1].mean().item(), second_copy=loss[:, n:].mean().item(),
                induction=induction / sequences, sequences=sequences)


def print_heads(tally, induction):
    """The head table: what each head does over the text (tally), and its induction score."""
    means = tally["head_sum"] / tally["head_rows"].clamp(min=1)  # (n_layer, nh, 4)
    print("\nwhat the heads do over the text (mean distance looked back in tokens; share of the weight on the "
          "previous token, the line's start, itself), and their induction score on repeated random tokens:")
    print(f"{'layer':>5} {'head':>4} {'looks back':>10} {'previous':>9} {'line start':>10} {'itself':>7} "
          f"{'induction':>9}")
    for layer, head in np.ndindex(*induction.shape):
        distance, previous, start, itself = means[layer, head].tolist()
        print(f"{layer:>5} {head:>4} {distance:>10.1f} {previous:>9.1%} {start:>10.1%} {itself:>7.1%} "
              f"{induction[layer, head].item():>9.1%}")


@torch.inference_mode()
def plot_attention(model, tokenizer, prompt, png_path):
    """attention.png: every head of every layer on the prompt's first block_size tokens, a heat map each (row:
    the token attending; column: the token attended to). Tokens label the outer axes only."""
    ids = start_ids(tokenizer, prompt)[:model.cfg.block_size]  # NFC, as --prompt is everywhere
    with recorded_attention(model) as maps:
        model(torch.tensor([ids], device=model.wte.weight.device))
    labels, ticks = [repr(tokenizer.decode([i]))[1:-1] for i in ids], range(len(ids))
    n_layer, n_head = len(maps), maps[0].size(1)
    plt, fig, axes = new_figure(n_layer, n_head, (3.3 * n_head, 3.3 * n_layer + 0.5))
    for (layer, head), ax in zip(np.ndindex(n_layer, n_head), np.ravel(axes)):
        ax.imshow(maps[layer][0, head].cpu().numpy(), vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer}, head {head}", fontsize=8)
        bottom = layer == n_layer - 1
        ax.set_xticks(ticks if bottom else [], labels if bottom else [], fontsize=5, rotation=90)
        ax.set_yticks(ticks if head == 0 else [], labels if head == 0 else [], fontsize=5)
    fig.suptitle("attention weights: row = the token attending, column = the token attended to", fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.06, top=0.9, wspace=0.05, hspace=0.15)  # less white
    save_figure(plt, fig, png_path, dpi=150, bbox_inches=None)


def evaluate_checkpoint(cfg, spec):
    """--evaluate: <out-dir>/ckpt.pt on the text: 1) its loss, 2) where it is surprised, 3) what its heads do,
    and in-context learning, 4) attention.png on --prompt, or on the passage shown."""
    ckpt = {}
    if cfg.init_from:  # GPT-2, or a checkpoint named by --init-from
        model, tokenizer = load_init_from(cfg.init_from, pick_device(cfg.device))[:2]
    else:
        ckpt, model = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), pick_device(cfg.device))
        tokenizer = tokenizer_from_state(ckpt.get("tokenizer", {}))
    start_ids(tokenizer, cfg.prompt)  # a --prompt it cannot encode (for attention.png): said before the work
    m, t0 = model.cfg, time.perf_counter()
    scored, tally = evaluate(model, tokenizer, spec)
    seconds = time.perf_counter() - t0
    char_losses = [character_losses(text, ids, losses, tokenizer) for _, text, ids, losses in scored]
    print_losses(scored, char_losses, m.vocab_size)
    by_context = (tally["position_sum"] / tally["position_rows"])[tally["position_rows"] > 0]  # [t]: t+1 tokens seen
    half, stride = len(by_context) // 2, max(1, m.block_size // 2)
    print(f"{sum(len(s[3]) for s in scored):,} tokens in {seconds:.1f} s, each predicted once, from "
          f"{m.block_size - stride + 1} to {m.block_size} tokens of context (fewer in a document's first "
          f"{m.block_size - stride}: windows of {m.block_size} tokens every {stride}). The loss with 1 token of "
          f"context: {by_context[0]:.3f}, 2 to {half}: "
          f"{by_context[1:half].mean():.3f}, more: {by_context[half:].mean():.3f}; their mean, as training's val loss "
          f"weighs them: {by_context.mean():.4f}" + (f" (the checkpoint's: {ckpt['best_val_loss']:.4f})" if ckpt else ""))
    text = scored[0][1]
    cut = text.find("\n\n", len(text) // 2)  # the passage shown: the first paragraph after the middle
    start = cut + 2 if cut >= 0 else 0
    print_surprise(text, char_losses[0], sys.stdout.isatty(), start)
    print_contexts([s[1] for s in scored], char_losses)
    if m.block_size < 4:  # a sequence and its copy need two tokens each
        print_heads(tally, torch.full((m.n_layer, m.n_head), math.nan))
        print(f"in-context learning: not measured, a block of {m.block_size} tokens cannot hold a sequence twice")
    else:
        icl = repeated_tokens_test(model, seed=cfg.seed)
        print_heads(tally, icl["induction"])
        print(f"in-context learning: {icl['sequences']} random sequences of {m.block_size // 2} tokens, repeated: "
              f"loss {icl['first_copy']:.3f} nats on the first copy, {icl['second_copy']:.3f} on the second (ln V: "
              f"{math.log(m.vocab_size):.3f})")
    prompt, png = cfg.prompt or text[start:start + 64], os.path.join(cfg.out_dir, "attention.png")
    os.makedirs(cfg.out_dir, exist_ok=True)  # with --init-from, --out-dir may not exist yet
    plot_attention(model, tokenizer, prompt, png)
    print(f"drew {png}: every head on {prompt[:40]!r}...")


# ---- The data path at scale, measured (--bench-data): memory flat in the corpus size, time linear ----

def bench_data(cfg, max_mb, keep):
    """Generated corpora of 10 MB, 100 MB, ... up to --bench-data MB, each tokenized with characters and
    with BPE 4096 and then trained on for 50 steps, each case in a fresh process so that its peak memory
    (RSS) is its own. Everything is written into --out-dir when one is given (and kept, so the corpora
    are made once), else into a temporary directory, removed at the end."""
    root = cfg.out_dir if keep else tempfile.mkdtemp(prefix="gpt-bench-data-")
    sizes = sorted({*(10 ** k for k in range(1, 7) if 10 ** k < max_mb), max_mb})
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"data path: corpora of 1 MB files (speeches of input.txt in random order) in {root}; each case "
          f"tokenizes, then trains the cpu preset's model 50 steps ({os.cpu_count()} cores{load})")
    print(f"{'MB':>6} {'tokenizer':>9} {'tokenize s':>10} {'MB/s':>6} {'BPE train s':>11} {'50 steps s':>10} {'peak RSS MiB':>12}")
    cases = {}
    try:
        for mb in sizes:
            corpus = make_corpus(os.path.join(root, f"corpus-{mb}mb"), mb)
            for tokenizer in ("char", "bpe"):
                case = bench_data_case(corpus, tokenizer, os.path.join(root, f"run-{mb}mb-{tokenizer}"))
                cases[mb, tokenizer] = case
                print(f"{mb:>6} {tokenizer:>9} {case['tokenize']:>10.1f} {case['mb'] / case['tokenize']:>6.1f} "
                      f"{case['bpe_train']:>11.1f} {case['train']:>10.1f} {case['peak'] / 2**20:>12.0f}", flush=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    largest = sizes[-1]
    print(f"at {largest} MB: tokenized at {cases[largest, 'char']['mb'] / cases[largest, 'char']['tokenize']:.1f} MB/s "
          f"(char) and {cases[largest, 'bpe']['mb'] / cases[largest, 'bpe']['tokenize']:.1f} MB/s (BPE); largest peak "
          f"RSS {max(case['peak'] for case in cases.values()) / 2**30:.2f} GiB")
    return cases


def make_corpus(path, mb, seed=0):
    """mb files of about 1 MB, each of speeches of input.txt drawn at random: real words in new orders,
    so BPE meets text like a corpus's, not one file repeated. Written once, under a temporary name."""
    if not os.path.isdir(path):
        speeches = read_text(os.path.join(os.path.dirname(os.path.abspath(__file__)), "input.txt")).split("\n\n")
        per_file = 10**6 * len(speeches) // sum(len(speech) + 2 for speech in speeches)
        rng, tmp = random.Random(seed), path + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        for i in range(mb):
            with open(os.path.join(tmp, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
                f.write("\n\n".join(rng.choices(speeches, k=per_file)) + "\n")
        os.replace(tmp, path)
    return path


def bench_data_case(corpus, tokenizer, out_dir):
    """One run of gpt.py in a fresh Python: tokenize the corpus anew, train 50 steps; times and peak RSS."""
    shutil.rmtree(out_dir, ignore_errors=True)  # no token files to reuse: the case measures building them
    argv = ["--input", corpus, "--tokenizer", tokenizer, "--max-iters", "50", "--out-dir", out_dir, "--preset", "cpu",
            "--device", "cpu", "--no-plot", "--max-new-tokens", "0", *(["--vocab-size", "4096"] if tokenizer == "bpe" else [])]
    code = ("import json, sys, time; sys.path.insert(0, sys.argv[1]); import gpt; t0 = time.perf_counter(); "
            "gpt.main(sys.argv[2:]); print(json.dumps({'seconds': time.perf_counter() - t0, 'peak': gpt.peak_rss()}))")
    done = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), *argv],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"--bench-data: the {tokenizer} run on {corpus} failed: "
                         f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    result, meta = json.loads(done.stdout.strip().splitlines()[-1]), read_token_meta(out_dir)
    bpe_train = re.search(r"^trained a BPE tokenizer of \d+ tokens in ([\d.]+) s$", done.stdout, re.M)
    return dict(mb=meta["bytes"] / 1e6, tokenize=meta["seconds"], train=result["seconds"] - meta["seconds"],
                bpe_train=float(bpe_train.group(1)) if bpe_train else 0.0, peak=result["peak"])


# ==============================================================================================
# Part III — machinery
# ==============================================================================================

# ---- Token files: a corpus larger than memory ----------------------------------------------------
# The input (a file, a directory or a glob; a .txt file is one document, a .jsonl line another) is read
# once, in pieces, and its token ids are appended to <out-dir>/train.bin and val.bin, a batch of pieces at
# a time: memory holds one batch, whatever the corpus. Training reads its windows from memory maps of the
# two files, so only the pages it touches are loaded; tokens.json, written last, records what the files
# were built from, so that the next run with the same input and tokenizer reuses them.

PIECE_CHARS = 1 << 20  # characters read from a file at a time

BATCH_CHARS = 1 << 24  # characters encoded at a time: enough pieces for every core, ~0.3 GB of ids at most


def load_token_files(cfg, tokenizer, log):
    """load_data for a corpus: rank 0 makes sure <out-dir>/train.bin and val.bin hold its ids (while the
    other ranks of torchrun wait), then every rank maps the same files."""
    if int(os.environ.get("RANK", 0)) == 0:
        prepare_token_files(cfg, tokenizer, log)
    if dist.is_initialized():
        dist.barrier()
    meta, train, val = open_token_files(cfg.out_dir)
    if meta["bytes"] == 0:
        raise ValueError(f"{cfg.input}: no text in it (every file is empty); pass files that hold text")
    unit = meta["unit"]
    documents = meta["train"]["documents"] + meta["val"]["documents"] if meta["validation"] != "last 10 %" else 1
    return Data(tokenizer_from_state(meta["tokenizer"]), train, val, unit,
                meta["val"]["characters" if unit == "char" else "bytes"],
                meta["train"]["characters"] + meta["val"]["characters"], documents)


def input_files(spec, option="--input"):
    """--input (or --evaluate, the option) as a sorted list of files: the file itself, every *.txt and *.jsonl file below a directory,
    or the files a glob matches."""
    if os.path.isdir(spec):
        files = unique_files([os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
                              if name.endswith((".txt", ".jsonl"))])
        what = "no *.txt or *.jsonl file below this directory"
    elif os.path.exists(spec):
        files, what = [spec], ""
    elif any(c in spec for c in "*?["):
        files, what = glob_files(spec), "the glob matches no file"
    else:
        files, what = [], "no such file"
    if not files:
        raise ValueError(f"{spec}: {what}; pass a text file, a directory or a quoted glob with {option}")
    if len(files) == 1 and os.path.getsize(files[0]) == 0:
        raise ValueError(f"{files[0]}: file is empty; pass a text file with {option}")
    return sorted(files)


def glob_files(pattern):
    """The files a glob matches, ** included, without following links to directories: a link to '.' would
    repeat every document (and two of them would never end). A file reached twice is read once."""
    head, sep, tail = pattern.partition("**" + os.sep)
    if not sep:
        paths = glob.glob(pattern)
    else:  # ** matches any depth below head: walk it (os.walk does not follow links), glob the tail in each folder
        roots = [d for d in glob.glob(head or os.curdir) if os.path.isdir(d)]
        paths = [p for root in roots for folder, _, _ in os.walk(root) for p in glob_files(os.path.join(folder, tail))]
    return unique_files(paths)


def unique_files(paths):
    """The paths that are files (not a directory, not a link to nothing), each file once however many links
    reach it (a copy of a training document must not validate), sorted."""
    unique = {os.path.realpath(p): p for p in sorted(paths, reverse=True) if os.path.isfile(p)}
    return sorted(unique.values())


SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)|(?<=\S)(?= )")  # where file_pieces may cut: see there


def file_pieces(path):
    """A text file in pieces of about PIECE_CHARS characters, NFC-normalised, each cut where no split pattern
    joins text across (GPT-4's or GPT-2's): after a single line break between two non-spaces (GPT-2 splits two
    line breaks in two inside a text, but keeps them as one chunk at its end), or before a space that a
    non-space precedes. So BPE encodes the pieces one by one into exactly the ids of the whole file. Only the
    text read since the last cut is searched, so the work is linear in the file (no place to cut: one piece)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not text
            parts = []  # the text since the last cut, joined only at a cut: linear even with no place to cut
            while block := f.read(PIECE_CHARS):
                last = parts.pop() if parts else ""  # its end normalised again with the block: a mark may follow its letter
                parts.append(last[:-16])
                block = unicodedata.normalize("NFC", last[-16:] + block)
                cut = last_cut(block, 1)
                if 0 < cut < len(block):
                    yield "".join(parts) + block[:cut]
                    parts, block = [], block[cut:]
                parts.append(block)
            if parts:
                yield "".join(parts)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror})") from None


def last_cut(text, start):
    """The last place in text[start:] where file_pieces may cut (0: none), looked for in the last 4 kB first."""
    for begin in (max(start, len(text) - 4096), start):
        cut = max((m.end() for m in SAFE_CUT.finditer(text, begin)), default=0)
        if cut:
            return cut
    return 0


def jsonl_texts(path):
    """The documents of a JSON Lines file, one {"text": ...} per line, NFC-normalised; blank lines and empty texts
    skipped."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise TypeError
                if record["text"]:
                    yield unicodedata.normalize("NFC", record["text"])
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    except (ValueError, TypeError):
        raise ValueError(f'{path}, line {number}: not a JSON object with a "text" string, as each line of a '
                         '.jsonl file must be') from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror})") from None


def documents(files):
    """Every document of the input, each as an iterable of text pieces."""
    for path in files:
        if path.endswith(".jsonl"):
            yield from ([text] for text in jsonl_texts(path))
        elif os.path.getsize(path):
            yield file_pieces(path)


def validation_cut(files):
    """A single text file validates on its last 10 % (the character where it starts, counted in one pass);
    several documents on every tenth document (None)."""
    if len(files) == 1 and not files[0].endswith(".jsonl"):
        return int(0.9 * sum(map(len, file_pieces(files[0]))))
    return None


def split_pieces(files, cut):
    """(split, piece, starts a document) for the whole input, in order. With a cut, the file's first cut
    characters train and the rest validates; each part is encoded on its own, so no token straddles
    the cut. Without, document i validates if i % 10 == 9: validation text is never trained on."""
    if cut is not None:
        done = 0
        for piece in file_pieces(files[0]):
            head, tail = piece[:max(0, cut - done)], piece[max(0, cut - done):]
            if head:
                yield "train", head, done == 0
            if tail:
                yield "val", tail, done <= cut
            done += len(piece)
        return
    for i, pieces in enumerate(documents(files)):
        for j, piece in enumerate(pieces):
            yield "val" if i % 10 == 9 else "train", piece, j == 0


def with_progress(items, what, log, every=5.0):
    """The (split, piece, starts) items of a pass over the input, passed on; for a pass long enough to wonder
    about, '{what}: 120.0 M characters done, 35.2 M/s' every few seconds."""
    start = shown = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += len(item[1])
        if time.perf_counter() - shown >= every:
            shown = time.perf_counter()
            log(f"{what}: {done / 1e6:,.1f} M characters done, {done / 1e6 / (shown - start):.1f} M/s")


def train_bpe(text, vocab_size, log):
    """A byte-level BPE tokenizer trained on text (tokenizer_bpe.py, the lesson of its own)."""
    import tokenizer_bpe  # only the BPE option needs it
    t0 = time.perf_counter()
    tokenizer = tokenizer_bpe.BPETokenizer()
    tokenizer.train(text, vocab_size)
    log(f"trained a BPE tokenizer of {len(tokenizer.vocab)} tokens in {time.perf_counter() - t0:.2f} s")
    return tokenizer


def build_tokenizer(files, cut, cfg, log=print):
    """make_tokenizer for a corpus, in one pass over it: every character of the input (and the newline of the
    separator), or the first bpe_sample_mb of its training text."""
    chars, sample, size, limit = set() if cut is not None else {"\n"}, [], 0, int(cfg.bpe_sample_mb * 1e6)
    for split, piece, starts in with_progress(split_pieces(files, cut), "finding the characters", log):
        if cfg.tokenizer == "char":
            chars.update(piece)
        elif size >= limit:
            break
        elif split == "train":
            sample.append(("\n" if starts and sample else "") + piece[:limit - size])
            size += len(sample[-1])
    return make_tokenizer(cfg, chars, "".join(sample), log)


def batch_encoder(tokenizer, pool):
    """A function from a list of text pieces to their ids, one after the other, as a numpy array.
    Characters go through a lookup table indexed by code point; BPE through tiktoken (Rust), a piece per
    thread of pool: tiktoken lets go of Python's lock while it encodes, and hands back numpy arrays."""
    if not hasattr(tokenizer, "to_tiktoken"):  # characters
        table = np.full(0x110000, -1, dtype=np.int32)  # every Unicode code point -> its id; -1: not in the vocabulary
        table[[ord(ch) for ch in tokenizer.chars]] = np.arange(len(tokenizer.chars))
        return lambda pieces: char_ids("".join(pieces), table)
    # Each thread gets an Encoding of its own. The regex engine under tiktoken keeps its scratch space in
    # a pool that only the first thread to search reaches without a lock; threads sharing one Encoding
    # spent over a quarter of their time taking and returning that lock (2 threads: 15 MB/s shared, 35 apart).
    local, lock = threading.local(), threading.Lock()

    def encode_piece(piece):
        if not hasattr(local, "encoding"):
            with lock:  # to_tiktoken re-derives the tokenizer's tables: one thread at a time
                local.encoding = tokenizer.to_tiktoken()
        return local.encoding.encode_to_numpy(piece, allowed_special="all")
    return lambda pieces: np.concatenate(list(pool.map(encode_piece, pieces)))


def char_ids(text, table):
    """The ids of text's characters: ASCII text is its own bytes, any other is read as UTF-32 code points."""
    ascii = text.isascii()
    codes = np.frombuffer(text.encode("ascii" if ascii else "utf-32-le"), dtype=np.uint8 if ascii else np.uint32)
    ids = table[codes]
    if (ids < 0).any():
        unknown = chr(codes[np.argmax(ids < 0)])
        raise ValueError(f"character {unknown!r} of --input is not in the vocabulary of this character-level model; "
                         "remove it from the text, or use a --tokenizer bpe model, which encodes any text")
    return ids


def input_fingerprint(files):
    """What token files are built from: each input file's path, size and modification time, hashed."""
    stats = [(os.path.abspath(p), s.st_size, s.st_mtime_ns) for p in files for s in [os.stat(p)]]
    return hashlib.sha256(json.dumps(stats).encode("utf-8")).hexdigest()


def prepare_token_files(cfg, tokenizer, log):
    """Make <out-dir>/train.bin and val.bin hold the input's ids, unless tokens.json shows that they already
    do: the same input files and either this tokenizer (resuming, fine-tuning) or, for a new one, the
    same recipe. Otherwise tokens.json goes first, the files are written under temporary names and
    renamed, and tokens.json comes last: an interrupted build leaves nothing that looks whole."""
    files = input_files(cfg.input)
    recipe = {"tokenizer": cfg.tokenizer, **({"vocab_size": cfg.vocab_size, "bpe_sample_mb": cfg.bpe_sample_mb}
                                              if cfg.tokenizer == "bpe" else {})}
    meta_path = os.path.join(cfg.out_dir, "tokens.json")
    if token_files_current(read_token_meta(cfg.out_dir), cfg.out_dir, files, recipe, tokenizer):
        log(f"token files in {cfg.out_dir} are up to date (same input, same tokenizer): reused")
        return
    with suppress(FileNotFoundError):
        os.remove(meta_path)
    t0 = time.perf_counter()
    cut = validation_cut(files)
    tokenizer = tokenizer or build_tokenizer(files, cut, cfg, log)
    meta = write_token_files(files, cut, tokenizer, cfg.out_dir, log)
    meta.update(version=1, input=cfg.input, fingerprint=input_fingerprint(files), recipe=recipe,
                tokenizer=tokenizer_state(tokenizer), seconds=round(time.perf_counter() - t0, 3))
    with replaced_whole(meta_path, "the token files' record", "w") as f:
        json.dump(meta, f)
    log(f"tokenized {meta['bytes']:,} bytes in {meta['seconds']:.2f} s ({meta['bytes'] / 1e6 / meta['seconds']:.1f} "
        f"MB/s) into {os.path.join(cfg.out_dir, 'train.bin')} and val.bin")


def token_files_current(meta, out_dir, files, recipe, tokenizer):
    """Whether tokens.json vouches for train.bin and val.bin as the ids of these files by this tokenizer
    (or, when there is none yet, by this recipe), and both files have the size it says."""
    if not meta or meta["fingerprint"] != input_fingerprint(files):
        return False
    if (meta["tokenizer"] != json.loads(json.dumps(tokenizer_state(tokenizer)))) if tokenizer else (meta["recipe"] != recipe):
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    paths = {split: os.path.join(out_dir, f"{split}.bin") for split in ("train", "val")}
    return all(os.path.isfile(path) and os.path.getsize(path) == meta[split]["tokens"] * itemsize
               for split, path in paths.items())


def write_token_files(files, cut, tokenizer, out_dir, log):
    """Encode the input into train.bin and val.bin (uint16 ids when the vocabulary fits, else uint32), about
    BATCH_CHARS of a split at a time. A document after the first of its split starts with a separator:
    <|endoftext|> where the tokenizer has it, else a blank line (counted as neither characters nor bytes)."""
    dtype = np.uint16 if len(tokenizer.vocab) <= 2**16 else np.uint32
    has_eot = "<|endoftext|>" in getattr(tokenizer, "special_tokens", {})
    paths = {split: os.path.join(out_dir, f"{split}.bin") for split in ("train", "val")}
    counts = {split: dict(tokens=0, characters=0, bytes=0, documents=0) for split in paths}
    pending, pending_chars, last_char = {split: [] for split in paths}, dict.fromkeys(paths, 0), dict.fromkeys(paths, "")
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool, replaced_whole(paths["train"], "a token file") as train, \
            replaced_whole(paths["val"], "a token file") as val:
        encode, out = batch_encoder(tokenizer, pool), {"train": train, "val": val}

        def flush(split):  # the split's pending pieces, encoded, appended to its file
            ids = encode(pending[split]) if pending[split] else np.zeros(0)
            out[split].write(ids.astype(dtype))  # through Python's file: a full disk raises here
            counts[split]["tokens"] += len(ids)
            pending[split], pending_chars[split] = [], 0

        for split, piece, starts in with_progress(split_pieces(files, cut), "tokenizing", log):
            counts[split]["characters"] += len(piece)
            counts[split]["bytes"] += len(piece.encode("utf-8"))
            if starts and counts[split]["documents"]:
                piece = ("<|endoftext|>" if has_eot else "\n" if last_char[split] == "\n" else "\n\n") + piece
            counts[split]["documents"] += starts
            last_char[split] = piece[-1]
            pending[split].append(piece)
            pending_chars[split] += len(piece)
            if pending_chars[split] >= BATCH_CHARS:
                flush(split)
        for split in paths:
            flush(split)
            out[split].flush()  # a full disk fails here, while both files can still be removed
    return {"dtype": np.dtype(dtype).name, "unit": "char" if isinstance(tokenizer, CharTokenizer) else "byte",
            "bytes": sum(c["bytes"] for c in counts.values()),
            "validation": "last 10 %" if cut is not None else "every tenth document", **counts}


class TokenFile:
    """A token file as ids through a memory map: a read loads only the pages it touches, and gives them back."""

    def __init__(self, path, dtype):
        with open(path, "rb") as f:  # an empty file cannot be mapped: it is an empty array
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else None
        self.ids = np.frombuffer(self.map or b"", dtype=dtype)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        ids = np.array(self.ids[index])  # a copy, which outlives the pages
        if self.map and hasattr(self.map, "madvise"):
            self.map.madvise(mmap.MADV_DONTNEED)
        return ids


def read_token_meta(out_dir):
    """tokens.json, or None if there is none (or it is unreadable, or of another version)."""
    try:
        with open(os.path.join(out_dir, "tokens.json"), encoding="utf-8") as f:
            meta = json.load(f)
        return meta if meta.get("version") == 1 else None
    except (OSError, ValueError, AttributeError):
        return None


def open_token_files(out_dir):
    """tokens.json, and train.bin and val.bin as TokenFiles."""
    meta = read_token_meta(out_dir)
    return meta, *(TokenFile(os.path.join(out_dir, f"{split}.bin"), meta["dtype"]) for split in ("train", "val"))


def layers(m):
    return f"{m.n_layer} layer" + "s" * (m.n_layer != 1)


def describe(data, model, cfg, rt):
    """Check that each split holds a window of block_size + 1 tokens, and say what the run trains on."""
    for split, name in ((data.train, "training"), (data.val, "validation")):
        if len(split) <= model.cfg.block_size:
            hint = f" (every tenth document validates: it has {data.documents}, give at least ten)" * (
                1 < data.documents < 10)
            raise ValueError(f"{cfg.input}: the {name} split has {len(split)} tokens but needs more than "
                             f"block_size={model.cfg.block_size}{hint}; use a longer text or a smaller --block-size")
    docs = f"{data.documents:,} documents, " if data.documents > 1 else ""
    rt.log(f"{docs}{data.characters:,} characters, {len(data.train):,} train and {len(data.val):,} val tokens, "
           f"vocab {model.cfg.vocab_size}")
    m = model.cfg
    rt.log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters ({layers(m)}, {m.n_head} heads, "
           f"{m.n_embd} wide, block {m.block_size}) on {rt.device}")
    start_ids(data.tokenizer, cfg.prompt if cfg.max_new_tokens else "")  # a bad --prompt: said now, not after training
    if cfg.warmup_iters > cfg.max_iters > 0:  # the run's own settings, a resumed one's too (an experiment's: unseen)
        rt.log(f"note: --warmup-iters {cfg.warmup_iters} is longer than --max-iters {cfg.max_iters}: the learning "
               "rate never reaches its peak")


# ---- Checkpoints: everything to resume exactly or to sample, never lost -----------------------------

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes, so old files fail with a clear message


def tokenizer_state(tokenizer):
    """A plain dict that goes into the checkpoint (and tokens.json), so sampling needs no input text."""
    if hasattr(tokenizer, "chars"):
        return {"kind": "char", "chars": tokenizer.chars}
    return {"kind": "bpe", "bpe": tokenizer.to_dict()}


def tokenizer_from_state(state):
    try:
        if state["kind"] == "char":
            return CharTokenizer(state["chars"])
        import tokenizer_bpe
        return tokenizer_bpe.BPETokenizer.from_dict(state["bpe"], "the checkpoint's tokenizer")
    except (KeyError, TypeError) as err:
        raise ValueError(f"the checkpoint has no tokenizer, or an incomplete one (it lacks {err}: an older or hand-made "
                         "file?); train again") from None


def save_checkpoint(path, model, optimizers, model_cfg, train_cfg, step, best_val_loss, tokenizer, tokens=0):
    """Everything to resume exactly or to sample (tensors and plain types), written whole or not at all. The
    input is saved as an absolute path: a run resumed from another directory reads the same text."""
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": [o.state_dict() for o in optimizers],
             "model_config": dataclasses.asdict(model_cfg), "step": step, "tokens": tokens,
             "train_config": {**dataclasses.asdict(train_cfg), "input": os.path.abspath(train_cfg.input)},
             "best_val_loss": best_val_loss, "tokenizer": tokenizer_state(tokenizer),
             "rng": {"torch": torch.get_rng_state(),  # dropout's; the batches need none (batch_generator)
                     "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
    with replaced_whole(path, "the checkpoint") as f:
        torch.save(state, f)


@contextmanager
def replaced_whole(path, what, mode="wb"):
    """A file open at path + ".tmp" that replaces path once written whole and on disk (after a power cut: the old
    file or the new one). On any failure it is removed, the old file stays, and a failed write is one line."""
    binary = "b" in mode  # text: UTF-8, and the newlines as written (csv writes its own)
    try:  # opened here, not by torch.save: a failure names its cause
        with open(path + ".tmp", mode, encoding=None if binary else "utf-8", newline=None if binary else "") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except BaseException as err:
        with suppress(OSError):
            os.remove(path + ".tmp")
        raise write_error(path, what, err) from None


def write_error(path, what, err):
    """A failed write as a one-line ValueError (torch.save reports one as a RuntimeError); anything else as it was."""
    if not isinstance(err, (OSError, RuntimeError)):
        return err
    return ValueError(f"{path}: cannot write {what} ({write_failure(err)}); what was there before is unchanged")


def write_failure(err):
    """The real cause of a failed write, and what to do. torch.save reports a failed write as a
    RuntimeError ('unexpected pos') whose __context__ is the OSError that says why."""
    while not isinstance(err, OSError) and err.__context__ is not None:
        err = err.__context__
    if not isinstance(err, OSError):
        return str(err).strip().splitlines()[0]
    fixes = {errno.ENOSPC: "free some disk space", errno.EACCES: "make --out-dir writable",
             errno.EPERM: "make --out-dir writable", errno.EROFS: "pass a --out-dir on a writable disk"}
    return f"{err.strerror or err}: {fixes.get(err.errno, 'pass another --out-dir')}"


def load_checkpoint(path, device, attention=None, flag="--out-dir"):
    """The checkpoint dict and its rebuilt model, or a one-line error saying what is wrong; attention, if given,
    replaces the saved choice. flag: the one that named the file, for the error."""
    try:
        with open(path, "rb") as f:
            ckpt = torch.load(f, map_location=device, weights_only=True)
    except Exception as err:  # a bad path, too little memory or a damaged file: unreadable() says which
        raise ValueError(f"{path}: {unreadable(err, device, flag)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a gpt.py checkpoint of format {CHECKPOINT_FORMAT}; train again with this gpt.py")
    try:
        model = GPT(GPTConfig(**{**ckpt["model_config"], **({"attention": attention} if attention else {})}))
        model.load_state_dict(ckpt["model"])
    except (TypeError, KeyError, RuntimeError) as err:  # a missing part, or the weights of another model
        first_line = str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: checkpoint does not match this gpt.py's model ({first_line}); train again") from None
    return ckpt, model.to(device)


def unreadable(err, device, flag):
    """Why a checkpoint file could not be read: a bad path is not a bad checkpoint."""
    if isinstance(err, FileNotFoundError):
        return f"no checkpoint; train one first with `python gpt.py` (or pass another {flag})"
    if isinstance(err, (IsADirectoryError, NotADirectoryError, PermissionError)):  # the file itself may be fine
        return f"cannot open it as a checkpoint file ({err.strerror})"
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return f"not enough memory to load it on {device}; try --device cpu"
    return f"corrupt or truncated checkpoint, or not one gpt.py wrote ({type(err).__name__}); it cannot be read, so train again"


def require_parts(ckpt, path, *parts):
    """A checkpoint that lacks a part (an older or hand-made file) is a one-line error that names it."""
    missing = [part for part in parts if part not in ckpt]
    if missing:
        raise ValueError(f"{path}: the checkpoint has no {', '.join(missing)} (an older or hand-made file?); it "
                         "cannot be used for this, so train again")


def saved_train_config(ckpt):
    """The checkpoint's run settings; any this gpt.py no longer has (an older file's) are left out."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in ckpt["train_config"].items() if name in known})


def save_run(run, rt):
    """Rank 0 saves the run to <out-dir>/ckpt.pt."""
    if rt.master:
        save_checkpoint(os.path.join(run.cfg.out_dir, "ckpt.pt"), run.model, run.optimizers, run.model.cfg, run.cfg,
                        run.step, run.best_val_loss, run.data.tokenizer, run.tokens)


def restore_run_state(run, ckpt, rt):
    """What --resume restores besides the model: the optimizer's state, the step, the best validation loss and
    the random state (of dropout: each step's batches come from their own seed, batch_generator)."""
    saved = ckpt["optimizer"]  # a list; an older file's: one state, or {"parts": [...]}
    for optimizer, state in zip(run.optimizers, saved.get("parts", [saved]) if isinstance(saved, dict) else saved):
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(state)  # the moments; but this run's learning rates, decay and betas:
        for group, setting in zip(optimizer.param_groups, settings):  # a changed --learning-rate takes effect
            group.update(setting)
    run.step, run.best_val_loss, run.resumed = ckpt["step"], ckpt["best_val_loss"], True
    run.tokens = ckpt.get("tokens", run.step * run.tokens_per_step)  # (an older checkpoint: as if the batch was this one)
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())
    if ckpt["rng"]["cuda"] is not None and rt.device_type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
    rt.log(f"resumed from {os.path.join(run.cfg.out_dir, 'ckpt.pt')} at step {run.step}")


def load_for_resume(cfg, model_cfg, given, device):
    """The checkpoint, its model and tokenizer, and its run's settings, except what this command line
    sets again (say, a larger --max-iters); flags that fix the model must agree with it."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt, model = load_checkpoint(path, device, model_cfg.attention if "attention" in given else None)
    require_parts(ckpt, path, "train_config", "optimizer", "step", "best_val_loss", "rng")
    saved = saved_train_config(ckpt)
    check_unchanged(given, (model_cfg, cfg), (model.cfg, saved))
    cfg = dataclasses.replace(saved, **{name: getattr(cfg, name) for name in given if hasattr(saved, name)})
    if cfg.max_iters <= ckpt["step"]:  # a finished run, or a --max-iters it has passed
        raise ValueError(f"--max-iters {cfg.max_iters} is not beyond the checkpoint's step {ckpt['step']}: there is "
                         "nothing to train; give a larger --max-iters, or sample from it with --sample")
    return ckpt, model, tokenizer_from_state(ckpt["tokenizer"]), cfg


def load_for_fine_tuning(cfg, model_cfg, given, device):
    """The --init-from model and tokenizer; model flags given must agree with it, except that GPT-2 may take
    another --dropout or --attention, and a shorter --block-size (crop_block_size)."""
    gpt2 = names_gpt2(cfg.init_from)
    attention = model_cfg.attention if "attention" in given else None
    model, tokenizer, saved = load_init_from(cfg.init_from, device, attention, model_cfg.dropout)
    if gpt2 and "block_size" in given:
        crop_block_size(model, model_cfg.block_size)
    free = {"dropout", "attention", "block_size"} if gpt2 else set()
    check_unchanged(given - free, (model_cfg, cfg), (model.cfg, saved), "when fine-tuning (--init-from)")
    return model, tokenizer


def names_gpt2(spec):
    """Whether --init-from names GPT-2 (a name of GPT2_SIZES, a Hugging Face directory, a .safetensors file)
    rather than a checkpoint of ours."""
    return spec in GPT2_SIZES or os.path.isdir(spec) or spec.endswith(".safetensors")


def load_init_from(spec, device, attention=None, dropout=0.0):
    """The model, tokenizer and run settings (what check_unchanged holds flags to) that --init-from names:
    GPT-2's (Part II; dropout for fine-tuning), or a checkpoint's of ours."""
    if os.path.isfile(spec) and not names_gpt2(spec):
        ckpt, model = load_checkpoint(spec, device, attention, "--init-from")
        return model, tokenizer_from_state(ckpt["tokenizer"]), saved_train_config(ckpt)
    model = gpt2_from_pretrained(spec, dropout, attention or "sdpa")  # no such file: an error saying what to pass
    tokenizer = gpt2_tokenizer(gpt2_files(spec)[0])
    if len(tokenizer.vocab) != model.cfg.vocab_size:
        raise ValueError(f"--init-from {spec}: its tokenizer has {len(tokenizer.vocab):,} tokens, its model "
                         f"{model.cfg.vocab_size:,}; put the model's own vocab.json beside its weights")
    return model.to(device), tokenizer, TrainConfig(tokenizer="bpe", vocab_size=len(tokenizer.vocab))


def check_unchanged(given, flags, saved, when="on --resume"):
    """Resuming is the same command again plus --resume, so flags may be given again; but those that fix
    the model or its tokens must keep the checkpoint's values (when fine-tuning too). flags, saved:
    (model config, run config) from the command line and from the checkpoint."""
    (model_flags, run_flags), (model_saved, run_saved) = flags, saved
    fixed = [(f.name, model_flags, model_saved) for f in dataclasses.fields(GPTConfig) if "help" in f.metadata]
    fixed.append(("tokenizer", run_flags, run_saved))
    if run_saved.tokenizer == "bpe":  # merges learned: a new size or sample would change no token
        fixed += [("vocab_size", run_flags, run_saved), ("bpe_sample_mb", run_flags, run_saved)]
    elif {"vocab_size", "bpe_sample_mb"} & given:
        raise ValueError("--vocab-size and --bpe-sample-mb are for --tokenizer bpe: the checkpoint's characters are "
                         "its vocabulary")
    if when == "on --resume":  # the optimizer state is AdamW's (and Muon's); the seed drew the batches so far
        fixed += [(name, run_flags, run_saved) for name in ("optimizer", "seed", "init_from", "preset")]
    for name, new, old in fixed:
        if name in given and getattr(new, name) != getattr(old, name):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(new, name)} differs from the checkpoint's "
                             f"{getattr(old, name)}, and cannot change {when}: leave it out, or train anew "
                             "into another --out-dir")


# ---- One run per out-dir, and no checkpoint replaced unasked ----------------------------------------

@contextmanager
def claim_out_dir(cfg):
    """Before any work: create --out-dir, lock it for this run, and refuse to replace a checkpoint in
    it unless --resume or --overwrite says so (a forgotten --sample must not wipe a trained model)."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out-dir {cfg.out_dir}: cannot create it ({err.strerror}); pass a writable directory") from None
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun only rank 0 writes
        yield
        return
    with out_dir_lock(cfg.out_dir):
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        if os.path.exists(path) and not (cfg.resume or cfg.overwrite):
            refuse_to_replace(path)
        yield


def refuse_to_replace(path):
    """A one-line error: a checkpoint (readable or not) is in the way, and what to do about it."""
    try:  # mmap: the weights are not read
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:
        raise ValueError(f"{path} already exists and is not a readable checkpoint: replace it with --overwrite, or "
                         "pass another --out-dir") from None
    raise ValueError(f"{path} already exists (a checkpoint at step {step}): continue it with --resume, or replace it "
                     "with --overwrite, or pass another --out-dir")


@contextmanager
def out_dir_lock(out_dir):
    """One run at a time writes into out_dir: its lock file (pid and host) is created with O_EXCL, which only one
    run can do, and removed at the end; a lock whose owner died (SIGKILL, say) is stale, and taken over."""
    path = os.path.join(out_dir, "ckpt.pt.lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # rw-r--r--: a lock is no program
    except OSError as err:
        fd = take_stale_lock(path, out_dir, err)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {platform.node()}")
    try:
        yield
    finally:
        with suppress(OSError):
            os.remove(path)


def take_stale_lock(path, out_dir, err):
    """The lock file exists: take it over if its owner has died on this machine, else a one-line error."""
    owner = read_lock(path) if isinstance(err, FileExistsError) else None
    if owner and not process_alive(*owner):
        with suppress(FileNotFoundError):
            os.remove(path)
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    if isinstance(err, FileExistsError):
        who = f" (pid {owner[0]} on {owner[1]})" if owner else ""
        raise ValueError(f"--out-dir {out_dir}: another run{who} is writing into it; wait for it, or pass another "
                         f"--out-dir (if no run is, delete {path})") from None
    raise ValueError(f"--out-dir {out_dir}: cannot write into it ({err.strerror}); pass a writable directory") from None


def read_lock(path):
    """(pid, host) from a lock file, or None if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            pid, host = f.read().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def process_alive(pid, host):
    """Whether the lock's owner may still run: certainly dead only if it ran on this machine and no
    process has its pid now."""
    if host != platform.node() or os.name == "nt":  # on Windows os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        pass
    return True


# ---- log.csv: a row per evaluation and per log line -------------------------------------------------

LOG_COLUMNS = ["step", "tokens", "flops", "seconds", "lr", "train_loss", "val_loss", "val_bits"]


def start_log_csv(out_dir, ckpt):
    """<out-dir>/log.csv anew, or a resumed run's rows up to its checkpoint; returns the seconds they end at."""
    path, kept = os.path.join(out_dir, "log.csv"), []
    if ckpt and os.path.exists(path):
        with open(path, encoding="utf-8", newline="") as f:
            kept = [row for row in csv.DictReader(f) if int(row["step"]) <= ckpt["step"]]
    with replaced_whole(path, "the log", "w") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    return float(kept[-1]["seconds"]) if kept else 0.0


def log_row(run, lr, train_loss, val_loss=None, val_bits=None):
    """A row of log.csv: where the run stands (tokens, FLOPs, seconds of training) and its losses."""
    row = [run.step, run.tokens, run.tokens * flops_per_token(run.model.cfg), round(time.perf_counter() - run.started, 3), lr,
           train_loss, val_loss, val_bits]
    with open(os.path.join(run.cfg.out_dir, "log.csv"), "a", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(map(format_cell, row))


def format_cell(value):
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


# ---- Signals and pipes: Ctrl-C and SIGTERM save first; a closed reader ends the run quietly ----------

@contextmanager
def stop_on_signals(stop):
    """Within: Ctrl-C (SIGINT) and SIGTERM (kill, job schedulers, torchrun) only set stop["requested"], for the
    loop to act on between steps; a second signal of the same kind acts as it would outside."""
    def request_stop(signum, frame):
        stop["requested"] = True
        signal.signal(signum, previous[signum])

    previous = {signum: signal.signal(signum, request_stop) or signal.SIG_DFL  # None: not set from Python
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_if_diverged(run, loss=0.0):
    """A loss or weights that are no longer finite end the run before anything is saved: the checkpoint keeps
    the last finite weights."""
    if not (math.isfinite(loss) and all(p.isfinite().all() for p in run.model.parameters())):
        raise ValueError(f"the run diverged by step {run.step} (its loss or weights are no longer finite) and stops: "
                         f"{os.path.join(run.cfg.out_dir, 'ckpt.pt')} keeps the last good weights, if any; try a lower "
                         "--learning-rate (or --muon-lr), or --grad-clip 1")


def save_and_say_how_to_resume(run, rt):
    """Save where the run stopped, and say how to go on (on stderr if stdout has gone)."""
    stop_if_diverged(run)
    save_run(run, rt)
    message = f"saved step {run.step} to {os.path.join(run.cfg.out_dir, 'ckpt.pt')}; continue with --resume"
    if rt.stop["why"] == "stdout closed":
        print(f"stdout closed: {message}", file=sys.stderr)
    else:
        rt.log(f"interrupted: {message}")


# ---- The runtime: device, precision, torchrun's processes, torch.compile ------------------------------

@dataclasses.dataclass
class Runtime:
    """This process's device, its place among torchrun's processes, and whether a stop was asked for."""
    device: str
    device_type: str
    rank: int
    world_size: int
    local_rank: int
    master: bool  # rank 0
    stop: dict = dataclasses.field(default_factory=lambda: {"requested": False, "why": "interrupted"})

    def log(self, line):
        """Rank 0 prints at once (`| tee` shows it live); once the reader has gone (`| head`), the loop stops."""
        if not self.master:
            return
        try:
            print(line, flush=True)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # where later prints cannot fail
            self.stop.update(requested=True, why="stdout closed")


def setup_runtime(cfg):
    device = pick_device(cfg.device)
    rank, world_size, local_rank = join_torchrun(device) if "RANK" in os.environ else (0, 1, 0)
    if device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    device_type = "cuda" if device.startswith("cuda") else device
    if device_type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))  # torch uses all cores; share them
    torch.manual_seed(cfg.seed)
    return Runtime(device, device_type, rank, world_size, local_rank, rank == 0)


def join_torchrun(device):
    """(rank, world_size, local_rank) of this process among torchrun's, which sets RANK, WORLD_SIZE, LOCAL_RANK."""
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")  # gloo: CPU tensors
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def native_bf16(device_type):
    """Whether this device multiplies bfloat16 in hardware (GPUs from Ampere on, CPUs with AMX or AVX-512 BF16)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpu_has = lambda name: getattr(torch.cpu, name, lambda: False)()  # private: absent in some torch builds
    return device_type == "cpu" and (cpu_has("_is_amx_tile_supported") or cpu_has("_is_avx512_bf16_supported"))


def in_float32(attend, q, k, v, dropout_p):
    """attend(q, k, v) in float32, autocast or not; the result in q's dtype."""
    with torch.autocast(q.device.type, enabled=False):
        return attend(q.float(), k.float(), v.float(), dropout_p).to(q.dtype)


def batch_generator(seed, step, rank, world_size):
    """Each (step, rank) draws its batches from a seed of its own (torch keeps 32 bits of a seed; an odd factor
    keeps them apart modulo 2**32): a resumed run draws exactly the batches it would have, with no state saved."""
    return torch.Generator().manual_seed((seed + 1_000_003 * (step * world_size + rank)) % 2**32)


def wrap_model(run, rt):
    """What the steps run: run.model, compiled (--compile), wrapped for data-parallel training (torchrun)."""
    model = run.model
    if run.cfg.compile:
        model = compile_or_fall_back(model, run.data.train, run.cfg, model.cfg.block_size, rt.device, run.autocast)
    if rt.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return model


def compile_or_fall_back(model, train_data, cfg, block_size, device, autocast):
    """torch.compile fails late (at the first call) when no compiler toolchain works: try one step."""
    print("compiling the model (torch.compile: a minute or so, once)...", flush=True)
    try:
        compiled = torch.compile(model)
        x, y = get_batch(train_data, cfg.batch_size, block_size, torch.Generator().manual_seed(0), device)
        with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):  # the trial step
            with autocast:  # must not change the run: its dropout draws are undone
                compiled(x, y)[1].backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as err:
        print(f"--compile failed ({type(err).__name__}: {str(err).strip().splitlines()[0][:120]}); training without it")
        model.zero_grad(set_to_none=True)
        return model


def stop_agreed(run, rt):
    """Whether to stop now; every rank must agree (at log steps, as asking is a sync), or the others would hang."""
    if rt.world_size == 1 or run.step % run.cfg.log_interval:
        return rt.world_size == 1 and rt.stop["requested"]
    flag = torch.tensor([float(rt.stop["requested"])], device=rt.device)
    dist.all_reduce(flag)
    return flag.item() > 0


def end_data_parallel(rt, run, step_loss):
    """Under torchrun: each rank says where it ended, then the process group is torn down."""
    if rt.world_size > 1:
        print(f"rank {rt.rank}/{rt.world_size}: finished at step {run.step}; last logged loss {run.local_loss:.6f} on "
              f"this rank's batches, {step_loss.item():.6f} all-reduced", flush=True)
        dist.barrier()  # rank 0 may still be evaluating: tearing down gloo under it aborts the process
        dist.destroy_process_group()


def exit_before_gloo_threads_can_abort():
    """End a data-parallel process now, skipping Python's shutdown. DDP keeps the process group alive
    after destroy_process_group(), so its gloo worker threads still run, and one may be just now
    freeing the last all-reduce's tensors, which takes the interpreter's lock. During shutdown that
    ends the thread inside a C++ destructor: std::terminate, SIGABRT, and torchrun fails the run (3 of
    465 two-process runs on a busy 2-core CPU; a core dump shows the thread in ~AsyncWork -> take_gil)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- The command line: flags from the configs, their checks, main() --------------------------------
# bigram.py has read_text, add_flags, pick_device and run_command_line too, each a little simpler.

def read_text(path):
    """The text of a file, or a one-line ValueError that names the problem and the fix. A UTF-8 byte-order mark
    at the start (some editors write one) is not text: utf-8-sig drops it."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    except OSError as err:  # gpt.py sends only files here: a directory, say, goes to token files
        raise ValueError(f"{path}: cannot read it ({err.strerror}); pass a readable text file with --input") from None
    if not text:
        raise ValueError(f"{path}: file is empty; pass a text file with --input")
    return text


def add_flags(parser, config):
    """One --dashed-name flag per dataclass field that has help, typed, defaulted and checked by the field."""
    for field in dataclasses.fields(config):
        if "help" not in field.metadata:
            continue  # derived fields get no flag
        default, meta = getattr(config, field.name), field.metadata
        flag = "--" + field.name.replace("_", "-")
        help_text = meta["help"] + " (default: %(default)r)"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=checked(type(default), meta.get("valid")), default=default, help=help_text,
                                choices=meta.get("choices"))


def number(text, kind):
    """text as a kind (int or float), or nan if it is none: nan fails every test of a flag's rule."""
    try:
        return kind(text)
    except ValueError:
        return math.nan


def checked(kind, valid):
    """argparse's type= of a flag: the text as kind (int, float or str), refused unless valid[1] holds."""
    def convert(text):
        value = kind(text)  # a ValueError here is argparse's "invalid int value: 'x'"
        if valid and not valid[1](value):
            raise argparse.ArgumentTypeError(f"must be {valid[0]}, got {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


def pick_device(name):
    """'auto' means CUDA when there is one, else CPU; MPS only when asked for."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available here; use --device cpu")
    return name


def interrupt(signum, frame):
    raise KeyboardInterrupt


def run_command_line(main):
    """main() as a well-behaved Unix tool: each line reaches a pipe as it is printed; bad input ends in one line,
    `error: ...`, Ctrl-C in `interrupted`, and a reader that stops reading (`| head`) ends it quietly."""
    sys.stdout.reconfigure(line_buffering=True)
    if "RANK" not in os.environ:  # kill, job schedulers: as Ctrl-C (torchrun's agent keeps its own ways)
        signal.signal(signal.SIGTERM, interrupt)
    try:
        main()
    except ValueError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        sys.exit(1)


def parse_args(argv=None):
    """Both configs, and the flags given; --preset decides the defaults, so it is read first (without -h)."""
    def flag_parser(**kwargs):
        parser = argparse.ArgumentParser(**kwargs)
        parser.error = lambda message: parser.exit(2, f"error: {message}; see --help\n")  # one line, not the usage
        add_flags(parser, GPTConfig())
        add_flags(parser, TrainConfig())
        add_flags(parser, LabConfig())
        return parser

    first = flag_parser(add_help=False).parse_known_args(argv)[0]
    preset, why = first.preset, f"--preset {first.preset}"
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() and first.device in ("auto", "cuda") else "cpu"
        why = "--preset auto, " + ("CUDA is here" if preset == "gpu" else "no CUDA GPU here")
    parser = flag_parser(description=f"{__doc__.splitlines()[0]} The defaults shown are the {preset} preset's ({why}).")
    parser.set_defaults(**PRESETS[preset])
    parser.set_defaults(**(GPT2_FINE_TUNING if first.init_from and names_gpt2(first.init_from) else {}))
    args = parser.parse_args(argv)
    model_cfg = GPTConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"})
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    lab = LabConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LabConfig)})
    parser.set_defaults(**{name: None for name in vars(args)})  # parse again: what is not None was typed
    given = frozenset(name for name, value in vars(parser.parse_args(argv)).items() if value is not None)
    problem = config_problem(model_cfg, cfg, given)
    if problem:
        parser.error(problem)
    return model_cfg, cfg, given, lab


# nanoGPT's Shakespeare fine-tune in our flags, the defaults when --init-from names GPT-2 (flags given still win).
# A small, constant learning rate: each step should nudge good weights, not retrain them, and 20 steps are too
# few to schedule. AdamW, not Muon (Muon's steps have a set size whatever the gradient: made to move random
# weights far). No weight decay: it pulls every weight towards 0, away from what pretraining learned. 32 windows
# of 1,024 tokens per step, one at a time; dropout 0.1, as the text is small.
GPT2_FINE_TUNING = dict(optimizer="adamw", learning_rate=3e-5, warmup_iters=0, min_lr_ratio=1.0, weight_decay=0.0,
                        batch_size=1, grad_accum=32, max_iters=20, eval_interval=5, eval_iters=40, dropout=0.1,
                        tokenizer="bpe")


def config_problem(m, c, given=frozenset()):
    """The first bad combination of flags, as a one-line message, or None (argparse checks each flag alone)."""
    if m.n_embd % m.n_head:
        return f"--n-embd {m.n_embd} must be divisible by --n-head {m.n_head}"
    if m.rope and (m.n_embd // m.n_head) % 2:
        return f"--rope needs an even head size, but n_embd/n_head = {m.n_embd // m.n_head}"
    if m.n_head % m.kv_heads():
        return f"--n-kv-head {m.n_kv_head} must divide --n-head {m.n_head} (0 means n_head)"
    if c.resume and c.overwrite:
        return "--resume continues the checkpoint, --overwrite replaces it: give one of them"
    if c.tokenizer == "char" and {"vocab_size", "bpe_sample_mb"} & given and not (c.resume or c.init_from):
        return "--vocab-size and --bpe-sample-mb are for --tokenizer bpe: characters are their own vocabulary"
    return None


def checked_ids(ids, vocab_size):
    """ids (a list, or a 1-D tensor or array) as a list of ints in [0, vocab_size), or a one-line ValueError."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    for i in (i for i in ids if type(i) is not int or not 0 <= i < vocab_size):
        raise ValueError(f"{i!r} is not a token id of this vocabulary (0 to {vocab_size - 1}); pass a list or 1-D tensor of them")
    return ids


def check_generate(idx, max_new_tokens, vocab_size):
    """generate's input: a (B, T) tensor of token ids with T >= 1, and a count of new tokens >= 0."""
    if not (torch.is_tensor(idx) and idx.dim() == 2 and idx.size(1) > 0 and not idx.is_floating_point()):
        raise ValueError("idx must be a (batch, tokens) tensor of token ids, and the prompt must hold a token at least "
                         "(gpt.py starts an empty --prompt from start_ids)")
    checked_ids([idx.min().item(), idx.max().item()], vocab_size)  # the smallest and the largest id
    if not (type(max_new_tokens) is int and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def check_sampling(temperature, top_k, top_p):
    """generate's and sample_next_token's settings, checked by the rules of the flags of the same names."""
    rules = {field.name: field.metadata.get("valid") for field in dataclasses.fields(TrainConfig)}
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if not rules[name][1](value) or (name == "top_k" and not isinstance(value, int)):
            raise ValueError(f"{name} must be {rules[name][0]}, got {value}")


def note_ignored(who, flags):
    """Flags given that cannot act, said rather than silently dropped."""
    if flags:
        print(f"note: {who} ignores --{', --'.join(sorted(flags))}".replace("_", "-"), file=sys.stderr)


# The flags --sample uses; the model, its tokenizer and its training settings come from the checkpoint.
SAMPLE_FLAGS = {"out_dir", "device", "seed", "sample", "prompt", "max_new_tokens", "temperature", "top_k", "top_p",
                "kv_cache", "attention", "init_from"}


def sample(cfg, given=frozenset(), attention=None):
    """python gpt.py --sample: a sample from <out-dir>/ckpt.pt or --init-from's; attention, if given, replaces theirs."""
    note_ignored("--sample takes the model from the checkpoint, so it", given - SAMPLE_FLAGS)
    device = pick_device(cfg.device)
    if cfg.init_from:  # GPT-2, or a checkpoint of ours (load_init_from)
        return print_sample(*load_init_from(cfg.init_from, device, attention)[:2], cfg, device)
    ckpt, model = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device, attention)
    print_sample(model, tokenizer_from_state(ckpt.get("tokenizer", {})), cfg, device)


def main(argv=None):
    gc.freeze()  # torch's 160k objects live until exit: exempt them from garbage collection (0.5 s)
    model_cfg, cfg, given, lab = parse_args(argv)
    if cfg.sample:
        sample(cfg, given, model_cfg.attention if "attention" in given else None)
    elif any(getattr(lab, name) for name in given & LAB_FLAGS) or "evaluate" in given:  # --no-sweep: no study
        run_study(cfg, model_cfg, given, lab)  # a study instead of training (Part II)
    else:
        train(cfg, model_cfg, given)


if __name__ == "__main__":
    run_command_line(main)
