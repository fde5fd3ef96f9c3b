"""A complete decoder-only GPT in one file: tokenizer, model, training, checkpoints, generation.

    python gpt.py                         # train on input.txt, save out/ckpt.pt, print a sample
    python gpt.py --sample --prompt "ROMEO:"   # sample from the saved checkpoint
    torchrun --standalone --nproc_per_node=2 gpt.py   # data-parallel training on 2 GPUs (or CPU procs)

Read it top to bottom: config, data, model (attention -> block -> GPT), training, sampling, main().
"""
import argparse
import dataclasses
import gc
import math
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch warns without numpy; we never use it
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes, so old files fail with a clear message


# ----------------------------------------------------------------------------------------------
# Config: the single source of every hyperparameter; each field is also a --flag.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GPTConfig:
    block_size: int = dataclasses.field(default=64, metadata={"help": "context length in tokens"})
    n_layer: int = dataclasses.field(default=2, metadata={"help": "transformer blocks"})
    n_head: int = dataclasses.field(default=4, metadata={"help": "query heads per attention layer"})
    n_kv_head: int = dataclasses.field(default=0, metadata={"help": "key/value heads (grouped-query); 0 = n_head, 1 = multi-query"})
    n_embd: int = dataclasses.field(default=128, metadata={"help": "embedding width"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout probability while training"})
    bias: bool = dataclasses.field(default=True, metadata={"help": "biases in Linear and LayerNorm layers, as GPT-2"})
    rope: bool = dataclasses.field(default=False, metadata={"help": "rotary position embeddings, no position table"})
    vocab_size: int = 0  # derived from the tokenizer, so it has no flag

    def kv_heads(self):
        return self.n_kv_head or self.n_head


@dataclasses.dataclass
class TrainConfig:
    input: str = dataclasses.field(default="input.txt", metadata={"help": "training text (UTF-8)"})
    out_dir: str = dataclasses.field(default="out", metadata={"help": "where ckpt.pt is written and read"})
    preset: str = dataclasses.field(default="auto", metadata={"help": "default settings: cpu, gpu, or auto (gpu on CUDA)"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    seed: int = dataclasses.field(default=1337, metadata={"help": "random seed"})
    tokenizer: str = dataclasses.field(default="char", metadata={"help": "char, or bpe (tokenizer_bpe.py)"})
    vocab_size: int = dataclasses.field(default=512, metadata={"help": "BPE vocabulary size, with --tokenizer bpe"})
    max_iters: int = dataclasses.field(default=2000, metadata={"help": "optimizer steps"})
    eval_interval: int = dataclasses.field(default=500, metadata={"help": "steps between evaluations and checkpoints"})
    eval_iters: int = dataclasses.field(default=20, metadata={"help": "batches per split in each evaluation"})
    log_interval: int = dataclasses.field(default=100, metadata={"help": "steps between log lines"})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = dataclasses.field(default=1, metadata={"help": "micro-batches per optimizer step (per process)"})
    learning_rate: float = dataclasses.field(default=6e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = dataclasses.field(default=0.1, metadata={"help": "final learning rate as a fraction of the peak"})
    warmup_iters: int = dataclasses.field(default=100, metadata={"help": "steps of linear learning-rate warmup"})
    weight_decay: float = dataclasses.field(default=0.1, metadata={"help": "AdamW weight decay on 2-D weights"})
    beta2: float = dataclasses.field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = dataclasses.field(default=1.0, metadata={"help": "clip the gradient norm to this; 0 = off"})
    compile: bool = dataclasses.field(default=False, metadata={"help": "torch.compile the model (eager if it fails)"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue training from <out-dir>/ckpt.pt"})
    sample: bool = dataclasses.field(default=False, metadata={"help": "only sample from <out-dir>/ckpt.pt"})
    prompt: str = dataclasses.field(default="\n", metadata={"help": "text the sample continues"})
    max_new_tokens: int = dataclasses.field(default=500, metadata={"help": "tokens to generate"})
    temperature: float = dataclasses.field(default=0.8, metadata={"help": "sampling temperature; 0 = greedy"})
    top_k: int = dataclasses.field(default=0, metadata={"help": "sample among the k likeliest tokens; 0 = off"})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "nucleus: smallest set with this probability; 1 = off"})
    kv_cache: bool = dataclasses.field(default=True, metadata={"help": "generate with the KV cache (or recompute the context)"})


# Defaults per machine, chosen by measurement (see README): a 2-core CPU gets a small, wide-batch,
# high-learning-rate model that converges within ~90 s; a GPU gets the classic 6x6x384 model.
PRESETS = {
    "cpu": {},
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                learning_rate=1e-3, max_iters=5000, eval_interval=500, eval_iters=50, warmup_iters=100),
}


# ---- Helpers that bigram.py and gpt.py share VERBATIM --------------------------------------

def read_text(path):
    """The training text, or a one-line ValueError that names the problem and the fix."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; pass a text file with --input") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory; pass a text file with --input") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if not text:
        raise ValueError(f"{path}: file is empty; pass a text file with --input")
    return text


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

# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Data: text -> token ids -> random (x, y) windows, y being x shifted by one.
# ----------------------------------------------------------------------------------------------

class CharTokenizer:
    """Every distinct character of the text is one token."""

    def __init__(self, chars):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.vocab = dict(enumerate(chars))  # id -> character, as BPETokenizer.vocab is id -> bytes

    def encode(self, text):
        unknown = [ch for ch in dict.fromkeys(text) if ch not in self.stoi]  # in order of appearance
        if unknown:
            raise ValueError(f"character {unknown[0]!r} is not in the vocabulary of this model "
                             f"({len(unknown)} unknown in all); use only characters of the training text")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def build_tokenizer(text, cfg):
    if cfg.tokenizer == "char":
        return CharTokenizer("".join(sorted(set(text))))
    import tokenizer_bpe  # only the BPE option needs it
    tokenizer = tokenizer_bpe.BPETokenizer()
    tokenizer.train(text[: int(0.9 * len(text))], cfg.vocab_size)  # the training split only: no peeking at val
    return tokenizer


def encode(tokenizer, text):
    """Token ids; with BPE, <|endoftext|> in the text is the special token that separates documents."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text)
    return tokenizer.encode(text, allowed_special="all")


def tokenizer_state(tokenizer):
    """A plain dict that goes into the checkpoint, so sampling needs no input.txt."""
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "char", "chars": tokenizer.chars}
    return {"kind": "bpe", "bpe": tokenizer.to_dict()}


def tokenizer_from_state(state):
    if state["kind"] == "char":
        return CharTokenizer(state["chars"])
    import tokenizer_bpe
    return tokenizer_bpe.BPETokenizer.from_dict(state["bpe"], "the checkpoint's tokenizer")


def split_data(text, tokenizer, block_size, path):
    """90 % of the text for training, the last 10 % for validation, each encoded on its own so that no
    token straddles the cut; the validation split must hold at least one (x, y) window."""
    cut = int(0.9 * len(text))
    train = torch.tensor(encode(tokenizer, text[:cut]), dtype=torch.long)
    val = torch.tensor(encode(tokenizer, text[cut:]), dtype=torch.long)
    if len(val) <= block_size:
        raise ValueError(f"{path}: the validation split has {len(val)} tokens but needs more than "
                         f"block_size={block_size}; use a longer text or a smaller --block-size")
    return train, val


def get_batch(data, batch_size, block_size, generator, device):
    """batch_size random windows: inputs x, and targets y that are x shifted one token on."""
    starts = torch.randint(len(data) - block_size, (batch_size, 1), generator=generator)  # (B, 1)
    positions = starts + torch.arange(block_size)  # (B, T)
    x, y = data[positions], data[positions + 1]  # (B, T), (B, T)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Model: attention -> block -> GPT.
# ----------------------------------------------------------------------------------------------

def rope_frequencies(head_dim, max_len, base=10000.0):
    """cos and sin of the rotation angle of each position and frequency: (max_len, head_dim/2) each."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + hd/2]) by its position's angle: x (B, H, T, hd), cos/sin (T, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of the tokens seen so far, so each new token costs one position, not T."""

    def __init__(self, cfg, batch_size, device, dtype):
        shape = KVCache.shape(cfg, batch_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, n_kv, block, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens cached = the position of the next token

    def update(self, layer, k, v):
        """Store k, v (B, n_kv, T, hd) after the cached ones; return all keys and values so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @staticmethod
    def shape(cfg, batch_size):
        """Only n_kv_head heads are stored: grouped-query attention shrinks the cache n_head/n_kv_head times."""
        return cfg.n_layer, batch_size, cfg.kv_heads(), cfg.block_size, cfg.n_embd // cfg.n_head

    def nbytes(self):
        return self.k.nbytes + self.v.nbytes


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads()
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                     self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, L, hd), L = cached + T
        # Causal mask: query t (at absolute position L-T+t) sees keys 0..L-T+t. When T == L that is
        # the usual lower triangle; one new token sees everything cached, so it needs no mask.
        L = k.size(2)
        mask = None if T in (1, L) else torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T)
        y = F.scaled_dot_product_attention(  # softmax(q k^T / sqrt(hd)) v, fused
            q, k, v, attn_mask=mask, is_causal=(T == L and T > 1),
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream x only ever gets things added to it."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)  # tokens talk to each other
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token id -> vector: a lookup table
        self.wpe = None if cfg.rope else nn.Embedding(cfg.block_size, cfg.n_embd)  # position -> vector
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: reading and writing tokens share one table
        if cfg.rope:
            cos, sin = rope_frequencies(cfg.n_embd // cfg.n_head, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)  # derived, so not saved
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: keep the residual stream's variance flat in depth
            if name.endswith("proj.weight"):
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
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.cfg.rope:
            rope = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hd/2) each
        else:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))  # (B, T, C) + (T, C)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(B * T))
        return logits, loss

    @torch.inference_mode()  # like no_grad, minus autograd's version bookkeeping: faster per token
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, use_cache=True, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T). With the cache, the prompt is processed
        once and then one token per step; without it, the whole context is recomputed every step.
        Both see the same context: once it would exceed block_size, it slides to the newest half
        block, which the cache then re-processes (positions restart at 0). Half a block balances the
        two costs: every token still sees at least block/2 of context, and the re-processing happens
        once per block/2 new tokens instead of at every token."""
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
            next_id = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
        self.train(was_training)
        return idx


def sample_next_token(logits, temperature, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # greedy
    logits = logits.float() / temperature
    if top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the better tokens
        sorted_probs[before >= top_p] = 0.0  # keep the smallest prefix whose total reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # renormalises by itself


# ----------------------------------------------------------------------------------------------
# Training: schedule, optimizer, evaluation, checkpoints, the loop.
# ----------------------------------------------------------------------------------------------

def learning_rate(step, cfg):
    """1) linear warmup, 2) after decay the floor, 3) cosine from the peak down to the floor in between."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_iters:
        return peak * (step + 1) / cfg.warmup_iters
    if step >= cfg.max_iters:
        return floor
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)  # 0 -> 1
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def make_optimizer(model, cfg, device_type):
    """AdamW with weight decay on matrices only: biases, LayerNorm gains don't need shrinking."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")  # one kernel for all parameters instead of a loop
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), fused=fused)


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


def save_checkpoint(path, model, optimizer, model_cfg, train_cfg, step, best_val_loss, tokenizer):
    """Everything needed to resume exactly or to sample, as tensors and plain types (weights_only-safe).
    Written to a temp file and renamed, so a crash mid-write never leaves a broken ckpt.pt."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(train_cfg),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "best_val_loss": best_val_loss,
        "rng": {"torch": torch.get_rng_state(),  # dropout; the batches need none (batch_generator)
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
        "tokenizer": tokenizer_state(tokenizer),
    }
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except OSError as err:
        raise ValueError(f"{path}: cannot write the checkpoint ({err.strerror}); free some disk space "
                         "or pass another --out-dir") from None


def load_checkpoint(path, device):
    """The checkpoint dict and its rebuilt model, or a one-line error saying what is wrong."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no checkpoint; train one first with `python gpt.py` (or pass --out-dir)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file; all mean the same to a user
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}); "
                         "delete it and train again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a gpt.py checkpoint of format {CHECKPOINT_FORMAT}; train again with this gpt.py")
    try:
        TrainConfig(**ckpt["train_config"])
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, KeyError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: checkpoint does not match this gpt.py's model ({first_line}); train again") from None
    return ckpt, model.to(device)


def setup_distributed(device):
    """(rank, world_size, local_rank); torchrun sets RANK, WORLD_SIZE and LOCAL_RANK."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")  # gloo: CPU tensors
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def batch_generator(seed, step, rank, world_size):
    """Each rank's batches of one step come from their own seed: ranks draw different batches, and a
    resumed run draws exactly the batches it would have, with no generator state to save. torch's CPU
    generator keeps 32 bits of a seed; multiplying by an odd number is one-to-one modulo 2**32, so
    every (step, rank) gets its own seed."""
    return torch.Generator().manual_seed((seed + 1_000_003 * (step * world_size + rank)) % 2**32)


def exit_before_gloo_threads_can_abort():
    """End a data-parallel process now, skipping Python's shutdown. DDP keeps the process group alive
    after destroy_process_group(), so its gloo worker threads still run, and one may be just now
    freeing the last all-reduce's tensors, which takes the interpreter's lock. During shutdown that
    ends the thread inside a C++ destructor: std::terminate, SIGABRT, and torchrun fails the run (3 of
    465 two-process runs on a busy 2-core CPU; a core dump shows the thread in ~AsyncWork -> take_gil)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train(cfg, model_cfg, given=frozenset()):
    """Train from scratch, or from <out-dir>/ckpt.pt with --resume; given: the flags on the command line."""
    device = pick_device(cfg.device)
    rank, world_size, local_rank = setup_distributed(device)
    master = rank == 0  # only rank 0 logs, evaluates and saves
    if device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    device_type = "cuda" if device.startswith("cuda") else device
    if device_type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))  # torch uses all cores; share them
    torch.manual_seed(cfg.seed)
    # bf16 autocast on CUDA: matmuls in bfloat16, no loss scaling needed (unlike float16)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    log = print if master else (lambda *args, **kwargs: None)
    try:  # before any work, so a bad --out-dir costs nothing
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out-dir {cfg.out_dir}: cannot create it ({err.strerror}); pass a writable directory") from None

    # 1) data and tokenizer (from the checkpoint when resuming, so the ids mean the same)
    ckpt = None
    if cfg.resume:
        ckpt, model = load_checkpoint(ckpt_path, device)
        for name in given & {f.name for f in dataclasses.fields(GPTConfig)}:
            if getattr(model_cfg, name) != getattr(model.cfg, name):
                raise ValueError(f"--{name.replace('_', '-')} {getattr(model_cfg, name)} differs from the checkpoint's "
                                 f"{getattr(model.cfg, name)}; leave the model's flags out when resuming")
        # the run's own settings, except what this command line sets again (say, a larger --max-iters)
        saved = TrainConfig(**ckpt["train_config"])
        cfg = dataclasses.replace(saved, **{name: getattr(cfg, name) for name in given if hasattr(saved, name)})
        model_cfg = model.cfg
        tokenizer = tokenizer_from_state(ckpt["tokenizer"])
    text = read_text(cfg.input)
    if ckpt is None:
        t0 = time.perf_counter()
        tokenizer = build_tokenizer(text, cfg)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=len(tokenizer.vocab))
        if cfg.tokenizer == "bpe":
            log(f"trained a BPE tokenizer of {model_cfg.vocab_size} tokens in {time.perf_counter() - t0:.2f} s")
        model = GPT(model_cfg).to(device)
    train_data, val_data = split_data(text, tokenizer, model_cfg.block_size, cfg.input)
    # Loss is in nats per token; bits per character (char) or per byte (BPE) compare across tokenizers.
    unit = "char" if isinstance(tokenizer, CharTokenizer) else "byte"
    val_text = text[int(0.9 * len(text)):]
    units = len(val_text) if unit == "char" else len(val_text.encode("utf-8"))
    bits_per_unit = len(val_data) / units / math.log(2)  # multiply a loss in nats/token by this
    log(f"{len(text):,} characters, {len(train_data):,} train and {len(val_data):,} val tokens, "
        f"vocab {model_cfg.vocab_size}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters ({model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
        f"{model_cfg.n_embd} wide, block {model_cfg.block_size}) on {device}")

    # 2) optimizer and random state; resuming restores both, so the run continues exactly
    optimizer = make_optimizer(model, cfg, device_type)
    step, best_val_loss = 0, float("inf")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val_loss = ckpt["step"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if ckpt["rng"]["cuda"] is not None and device_type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        log(f"resumed from {ckpt_path} at step {step}")
    raw_model = model  # the uncompiled, unwrapped module: what we evaluate, save and sample
    if cfg.compile:
        model = compile_or_fall_back(model, train_data, cfg, model_cfg.block_size, device, autocast)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)

    def checkpoint():
        if master:
            save_checkpoint(ckpt_path, raw_model, optimizer, model_cfg, cfg, step, best_val_loss, tokenizer)

    # 3) the loop; Ctrl-C finishes the current step, saves and exits (a second Ctrl-C kills at once)
    tokens_per_step = cfg.batch_size * model_cfg.block_size * cfg.grad_accum * world_size
    t_log, steps_since_log = time.perf_counter(), 0
    start_step, local_loss, step_loss = step, float("nan"), torch.full((), float("nan"))
    stopping = False
    with stop_on_ctrl_c() as stop:
        while True:
            # (a resumed run has just been evaluated and saved at its first step)
            if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not (ckpt and step == start_step):
                if master:
                    losses = estimate_loss(raw_model, {"train": train_data, "val": val_data}, cfg,
                                           model_cfg.block_size, device, autocast)
                    best_val_loss = min(best_val_loss, losses["val"])
                    log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                        f"(val {losses['val'] * bits_per_unit:.3f} bits/{unit})")
                    checkpoint()
                t_log = time.perf_counter()  # evaluation time is not training time
            if step >= cfg.max_iters:
                break
            if world_size == 1:
                stopping = stop["requested"]
            elif step % cfg.log_interval == 0:  # every rank must agree to stop, or the others would wait forever;
                flag = torch.tensor([float(stop["requested"])], device=device)  # asked at log steps only: a sync
                dist.all_reduce(flag)
                stopping = flag.item() > 0  # kept apart from stop["requested"]: a Ctrl-C arriving now still counts
            if stopping:
                checkpoint()
                log(f"interrupted: saved step {step} to {ckpt_path}; continue with --resume")
                break

            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            batches = batch_generator(cfg.seed, step, rank, world_size)
            for micro_step in range(cfg.grad_accum):
                x, y = get_batch(train_data, cfg.batch_size, model_cfg.block_size, batches, device)
                last = micro_step == cfg.grad_accum - 1
                # DDP all-reduces gradients in backward(); only the last micro-step needs it
                with nullcontext() if world_size == 1 or last else model.no_sync():
                    with autocast:
                        _, loss = model(x, y)
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.detach() / cfg.grad_accum
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_since_log += 1

            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                local_loss = step_loss.item()  # this rank's batches only
                if world_size > 1:
                    dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
                elapsed = time.perf_counter() - t_log
                log(f"step {step}: loss {step_loss.item():.4f}, lr {lr:.2e}, {1000 * elapsed / steps_since_log:.1f} ms/step, "
                    f"{tokens_per_step * steps_since_log / elapsed:,.0f} tokens/s")
                t_log, steps_since_log = time.perf_counter(), 0
        if world_size > 1:
            print(f"rank {rank}/{world_size}: finished at step {step}; last logged loss {local_loss:.6f} on this rank's "
                  f"batches, {step_loss.item():.6f} all-reduced")
    if world_size > 1:
        dist.barrier()  # rank 0 may still be evaluating: tearing down gloo under it aborts the process
        dist.destroy_process_group()
    if master and not stopping and cfg.max_new_tokens > 0:
        print_sample(raw_model, tokenizer, cfg, device)
    if world_size > 1:
        exit_before_gloo_threads_can_abort()
    return raw_model


@contextmanager
def stop_on_ctrl_c():
    """Within: Ctrl-C (SIGINT) only sets stop["requested"], for the loop to act on between steps."""
    stop = {"requested": False}

    def request_stop(signum, frame):
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def compile_or_fall_back(model, train_data, cfg, block_size, device, autocast):
    """torch.compile fails late (at the first call) when no compiler toolchain works: try one step."""
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


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def print_sample(model, tokenizer, cfg, device):
    try:
        prompt_ids = encode(tokenizer, cfg.prompt)
    except ValueError:
        if cfg.prompt != TrainConfig.prompt:
            raise
        prompt_ids = [0]  # the default "\n" is not in this text's vocabulary: start from its first character
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.kv_cache, generator)
    elapsed = time.perf_counter() - t0
    print(tokenizer.decode(out[0].tolist()))
    mc = model.cfg
    if cfg.kv_cache:
        cache_bytes = 2 * math.prod(KVCache.shape(mc, 1)) * model.wte.weight.element_size()  # keys and values
        cache_note = f"KV cache {cache_bytes / 1024:.0f} KiB ({mc.kv_heads()} of {mc.n_head} heads keep K/V)"
    else:
        cache_note = "no KV cache: the whole context recomputed for every token"
    print(f"generated {cfg.max_new_tokens} tokens in {elapsed:.2f} s: {cfg.max_new_tokens / elapsed:.0f} tokens/s, {cache_note}")


def sample(cfg):
    device = pick_device(cfg.device)
    ckpt, model = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device)
    print_sample(model, tokenizer_from_state(ckpt["tokenizer"]), cfg, device)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    """Both configs from the command line; --preset first fills in the defaults for this machine."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(parser, GPTConfig())
    add_flags(parser, TrainConfig())
    first = parser.parse_known_args(argv)[0]
    preset = first.preset
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() and first.device in ("auto", "cuda") else "cpu"
    if preset not in PRESETS:
        parser.error(f"--preset {preset!r}: choose cpu, gpu or auto")
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    model_cfg = GPTConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"})
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    problem = config_problem(model_cfg, cfg)
    if problem:
        parser.error(problem)
    parser.set_defaults(**{name: None for name in vars(args)})  # parse again: what is not None was typed
    given = frozenset(name for name, value in vars(parser.parse_args(argv)).items() if value is not None)
    return model_cfg, cfg, given


def config_problem(m, c):
    """The first bad flag value, as a one-line message, or None."""
    for name in ("block_size", "n_layer", "n_head", "n_embd"):
        if getattr(m, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(m, name)}"
    for name in ("max_iters", "eval_iters", "eval_interval", "log_interval", "batch_size", "grad_accum"):
        if getattr(c, name) <= 0 and not (name == "max_iters" and getattr(c, name) == 0):
            return f"--{name.replace('_', '-')} must be positive, got {getattr(c, name)}"
    if m.n_embd % m.n_head:
        return f"--n-embd {m.n_embd} must be divisible by --n-head {m.n_head}"
    if m.rope and (m.n_embd // m.n_head) % 2:
        return f"--rope needs an even head size, but n_embd/n_head = {m.n_embd // m.n_head}"
    if m.n_kv_head < 0 or m.n_head % m.kv_heads():
        return f"--n-kv-head {m.n_kv_head} must divide --n-head {m.n_head} (0 means n_head)"
    if not 0.0 <= m.dropout < 1.0:
        return f"--dropout must be in [0, 1), got {m.dropout}"
    if c.tokenizer not in ("char", "bpe"):
        return f"--tokenizer {c.tokenizer!r}: choose char or bpe"
    if c.tokenizer == "bpe" and c.vocab_size < 257:
        return f"--vocab-size must be at least 257 for byte-level BPE, got {c.vocab_size}"
    if c.learning_rate <= 0 or not 0.0 <= c.min_lr_ratio <= 1.0:
        return "--learning-rate must be positive and --min-lr-ratio in [0, 1]"
    if c.warmup_iters < 0 or c.max_new_tokens < 0 or c.grad_clip < 0:
        return "--warmup-iters, --max-new-tokens and --grad-clip must not be negative"
    if c.temperature < 0 or c.top_k < 0 or not 0.0 < c.top_p <= 1.0:
        return "--temperature and --top-k must not be negative, and --top-p must be in (0, 1]"
    if c.device not in ("auto", "cpu", "cuda", "mps"):
        return f"--device {c.device!r}: choose auto, cpu, cuda or mps"
    return None


def main(argv=None):
    gc.freeze()  # torch's 160k objects live until exit: exempt them from garbage collection (0.5 s)
    model_cfg, cfg, given = parse_args(argv)
    if cfg.sample:
        sample(cfg)
    else:
        train(cfg, model_cfg, given)


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad input: one line, no traceback
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:  # Ctrl-C outside training (where it saves first): no traceback either
        sys.exit("interrupted")
