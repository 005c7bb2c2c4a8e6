"""The nanochat GPT that every Pilot service trains, aggregates and evaluates.

What this module does:
- ``GPTConfig``: the architecture, validated on construction (a bad field raises ``ConfigError`` naming it).
- ``preset_config``: named sizes: ``d<N>`` (nanochat depth presets: dim = 64·N, n_layer = N) and
  ``shakespeare-char`` (the Flower Tiny-Shakespeare example's 6 × 6 × 384, block 256, dropout 0.2).
- ``count_parameters`` / ``parameter_shapes``: sizes built on the meta device, never allocating weights.
- ``GPT``: the model. Notable features, as in nanochat:
    - rotary position embeddings (no learned positions), QK-norm
    - parameter-free RMSNorm (``F.rms_norm``), also right after the token embedding and before the head
    - ReLU² MLP with a 4× hidden width, no biases anywhere
    - untied token embedding (``wte``) and unembedding (``lm_head``)
    - optional grouped-query attention (``n_kv_head`` < ``n_head``), SDPA with ``is_causal``
    - logits soft-capped with ``softcap · tanh(logits / softcap)``
    - optional dropout (attention probabilities, residual branches, embedding), 0 by default
- ``param_groups``: which parameters are block matrices (Muon), the embedding, and the unembedding (AdamW).

The only parameters are ``transformer.wte.weight``, ``lm_head.weight`` and four/six 2-D matrices per block, so a
model with ``n_kv_head == n_head`` has exactly ``2·V·d + 12·d²·L`` parameters (d20 at V = 65,536: 560,988,160).
The rotary tables are non-persistent buffers: ``state_dict()`` holds only the parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pilot.errors import ConfigError

PRESET_FORMS = ("d<N> (N >= 1, e.g. d2, d6, d20, d32)", "shakespeare-char")
LOSS_REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -1  # target value whose position contributes no loss


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024  # longest context (rotary table length; generate() crops to it)
    vocab_size: int = 65536  # tokens in the tokenizer
    n_layer: int = 12  # transformer blocks
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head; must divide n_head)
    n_embd: int = 768  # model width; n_embd / n_head must be an even head dim (rotary rotates pairs)
    dropout: float = 0.0  # dropout probability in training mode (0 = off)
    softcap: float = 15.0  # logit soft-cap (0 = off)

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0 or (self.n_embd // self.n_head) % 2 != 0:
            raise ConfigError(
                f"GPTConfig.n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size"
            )
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head != 0:
            raise ConfigError(f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not (math.isfinite(float(self.softcap)) and float(self.softcap) >= 0.0):
            raise ConfigError(f"GPTConfig.softcap must be >= 0 (0 = off), got {self.softcap!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset_config(name: str, vocab_size: int, sequence_len: int | None = None) -> GPTConfig:
    """The config of a named preset at the given vocabulary size (and optionally context length).

    ``d<N>``: dim = 64·N, n_layer = N, heads = ceil(dim/128) (nanochat's rule), raised to the next head count
    that splits dim into even head dims where that rule does not (d5: 4 heads of 80). sequence_len 2048.
    ``shakespeare-char``: 6 layers, 6 heads, 384 dim, sequence_len 256, dropout 0.2.
    """
    if name == "shakespeare-char":
        return GPTConfig(sequence_len=sequence_len or 256, vocab_size=vocab_size, n_layer=6, n_head=6,
                         n_kv_head=6, n_embd=384, dropout=0.2)
    depth_text = name[1:] if name.startswith("d") else ""
    if not depth_text.isdigit() or int(depth_text) < 1:
        raise ConfigError(f"unknown model preset {name!r}; valid forms: {', '.join(PRESET_FORMS)}")
    depth = int(depth_text)
    dim = 64 * depth
    heads = max(1, math.ceil(dim / 128))
    while dim % heads != 0 or (dim // heads) % 2 != 0:
        heads += 1
    return GPTConfig(sequence_len=sequence_len or 2048, vocab_size=vocab_size, n_layer=depth, n_head=heads,
                     n_kv_head=heads, n_embd=dim)


def norm(x: Tensor) -> Tensor:
    """RMSNorm with no learnable parameters."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0,
                  device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(cos, signed sin), each (1, seq_len, 1, head_dim), fp32: cos = [c, c], sin = [s, -s] over the halves."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1)[None, :, None, :], torch.cat([sin, -sin], -1)[None, :, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, H, D) by position, pairing dim i with dim i + D/2 (nanochat's half-split layout):
    [x1, x2] → [x1·c + x2·s, x2·c − x1·s], computed as x·cos + roll(x, D/2)·sin (no slices: a cheaper
    backward on CPU than split + cat)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos, torch.roll(x, x.size(-1) // 2, dims=-1), sin)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.c_k = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.c_v = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # rotary, then QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.resid_drop(self.c_proj(F.relu(self.c_fc(x)).square()))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class ParamGroups(NamedTuple):
    matrix: list[nn.Parameter]  # 2-D transformer block weights (Muon)
    embedding: list[nn.Parameter]  # transformer.wte (AdamW)
    unembedding: list[nn.Parameter]  # lm_head (AdamW)


class GPT(nn.Module):
    """The model. ``GPT(cfg)`` leaves the weights uninitialised: call ``init_weights()`` (or use
    ``build_model``), or load a state dict. Unwrap DDP/compile wrappers before ``param_groups()``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        # _weight=empty skips nn.Embedding's own N(0, 1) fill: init_weights() or a state dict provides the
        # values, and on the meta device that fill would import torch._dynamo (~5-10 s on a small CPU).
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=torch.empty(cfg.vocab_size, cfg.n_embd)),
            "h": nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
        })
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.embed_drop = nn.Dropout(cfg.dropout)
        # Computed on the CPU and moved: ops on meta tensors would import torch._dynamo (seconds).
        device = self.lm_head.weight.device
        cos, sin = rotary_tables(cfg.sequence_len, cfg.head_dim, device=torch.device("cpu"))
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> GPT:
        """Materialise a meta-device model (weights uninitialised: call ``init_weights`` or load a
        state dict); the rotary tables, which no state dict carries, are recomputed here."""
        super().to_empty(device=device, recurse=recurse)
        self._reset_rotary()
        return self

    @torch.no_grad()
    def _reset_rotary(self) -> None:
        cos, sin = rotary_tables(self.config.sequence_len, self.config.head_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat init (deterministic given the torch seed): N(0, 1) embedding; block matrices
        N(0, std) with std = min(1, sqrt(fan_out/fan_in)) / sqrt(fan_in); zero lm_head and the two output
        projections of every block (each block starts as the identity)."""
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        for p in self.param_groups().matrix:
            fan_out, fan_in = p.shape
            nn.init.normal_(p, mean=0.0, std=min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in))
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self._reset_rotary()

    def param_groups(self) -> ParamGroups:
        """Every parameter, split the way the optimisers need it (raises if any is left over)."""
        groups = ParamGroups(list(self.transformer.h.parameters()), [self.transformer.wte.weight],
                             [self.lm_head.weight])
        if sum(len(g) for g in groups) != len(list(self.parameters())):
            raise ConfigError("GPT has parameters outside matrix/embedding/unembedding groups")
        return groups

    def estimate_flops_per_token(self) -> int:
        """Training FLOPs per token (fwd + bwd): 6 × non-embedding params + 12·L·H·D·T attention (nanochat)."""
        cfg = self.config
        n_matmul = sum(p.numel() for p in self.parameters()) - self.transformer.wte.weight.numel()
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.sequence_len

    def forward(self, idx: Tensor, targets: Tensor | None = None, loss_reduction: str = "mean") -> Tensor:
        """Logits (B, T, V) in fp32 when ``targets`` is None, else the cross-entropy loss.

        ``targets`` (B, T) uses ``-1`` for positions that carry no loss. ``loss_reduction``: "mean" (over
        non-ignored tokens) and "sum" give a scalar; "none" gives the per-token loss of shape (B, T), 0 at
        ignored positions (``.view(-1)`` for the flat form).
        """
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        B, T = idx.shape
        if T > self.config.sequence_len:
            raise ConfigError(f"input length {T} exceeds GPTConfig.sequence_len={self.config.sequence_len}")
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = self.embed_drop(norm(self.transformer.wte(idx)))
        for block in self.transformer.h:
            x = block(x, cos, sin)
        logits = self.lm_head(norm(x)).float()
        cap = self.config.softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=IGNORE_INDEX,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None) -> list[int]:
        """Sample ``max_new_tokens`` tokens after ``prompt_ids`` and return only the new ones.

        The context is cropped to the last ``sequence_len`` tokens; temperature 0 means greedy; dropout is
        off while sampling (the previous train/eval mode is restored).
        """
        if not prompt_ids:
            raise ConfigError("generate() needs a non-empty prompt_ids")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        device = self.lm_head.weight.device
        rng = torch.Generator(device=device)
        if seed is not None:
            rng.manual_seed(seed)
        else:
            rng.seed()
        was_training = self.training
        self.eval()
        ids = list(prompt_ids)
        try:
            for _ in range(max_new_tokens):
                context = torch.tensor([ids[-self.config.sequence_len:]], dtype=torch.long, device=device)
                logits = self(context)[0, -1]
                if temperature == 0:
                    next_id = int(logits.argmax())
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    next_id = int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=rng))
                ids.append(next_id)
        finally:
            self.train(was_training)
        return ids[len(prompt_ids):]


def meta_model(cfg: GPTConfig) -> GPT:
    """A GPT whose tensors live on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return GPT(cfg)


def count_parameters(cfg: GPTConfig) -> int:
    return sum(p.numel() for p in meta_model(cfg).parameters())


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape, in ``state_dict`` order (the names a checkpoint uses)."""
    return {name: tuple(p.shape) for name, p in meta_model(cfg).named_parameters()}


def build_model(cfg: GPTConfig, device: str | torch.device = "cpu") -> GPT:
    """A freshly initialised model on ``device`` (to load a checkpoint instead: build ``GPT(cfg)`` under
    ``torch.device(device)`` and ``load_state_dict(state, assign=True)``). Built directly on the device:
    a meta-device pass would cost a fresh process seconds of one-time torch imports."""
    with torch.device(device):
        model = GPT(cfg)
    model.init_weights()
    return model
