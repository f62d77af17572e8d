"""Benchmark workloads: an MLP (T = 1) and a small transformer-like sequence model (T tokens)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["mlp", "SeqModel", "Workload", "make_workload"]


def mlp(sizes: tuple[int, ...] = (784, 1024, 1024, 10)) -> nn.Sequential:
    """Linear layers with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (SDPA) and a GELU MLP, residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class SeqModel(nn.Module):
    """Token and position embeddings, pre-norm blocks, final LayerNorm, vocabulary head.

    Every module takes the sample dimension first (positions are expanded per sample),
    so per-sample methods see a standard batch-first model.
    """

    def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 2, heads: int = 4, max_len: int = 256) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        n, t = idx.shape
        pos = torch.arange(t, device=idx.device).expand(n, t)
        x = self.tok(idx) + self.pos(pos)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def mlp_loss(out: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy, shape (N,)."""
    return F.cross_entropy(out, y, reduction="none")


def seq_loss(out: Tensor, y: Tensor) -> Tensor:
    """Per-sample sum of token cross-entropies, shape (N,)."""
    n, t, v = out.shape
    return F.cross_entropy(out.reshape(n * t, v), y.reshape(n * t), reduction="none").view(n, t).sum(1)


@dataclass
class Workload:
    """A model with its data (a list of (inputs, targets) batches) and per-sample loss."""

    name: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    tokens: int  # T
    desc: str

    @property
    def samples(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self.batches)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def make_workload(kind: str, device: torch.device, *, batches: int, batch_size: int, scale: str = "full",
                  seed: int = 0) -> Workload:
    """``kind`` "mlp" (784-1024-1024-10, T = 1) or "seq" (2 blocks, d = 256, vocab 1000, T = 256).

    ``scale="tiny"`` shrinks both to a few thousand parameters (for the smoke test).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        sizes = (784, 1024, 1024, 10) if scale == "full" else (32, 16, 16, 10)
        model = mlp(sizes)
        data = [(torch.randn(batch_size, sizes[0], generator=g), torch.randint(sizes[-1], (batch_size,), generator=g))
                for _ in range(batches)]
        loss_fn, t = mlp_loss, 1
        desc = f"MLP {'-'.join(map(str, sizes))}, {batches} batches of {batch_size}"
    elif kind == "seq":
        vocab, d, layers, t = (1000, 256, 2, 256) if scale == "full" else (50, 16, 1, 8)
        model = SeqModel(vocab, d, layers, heads=4, max_len=t)
        data = [(torch.randint(vocab, (batch_size, t), generator=g), torch.randint(vocab, (batch_size, t), generator=g))
                for _ in range(batches)]
        loss_fn = seq_loss
        desc = (f"sequence model ({layers} pre-norm attention blocks, d={d}, vocab {vocab}), "
                f"{batches} batches of {batch_size}×{t} tokens")
    else:
        raise ValueError(f"unknown workload {kind!r}")
    model = model.to(device)
    data = [(x.to(device), y.to(device)) for x, y in data]
    return Workload(kind, model, data, loss_fn, t, desc)
