"""A small decoder-only transformer (GPT): token and position embeddings, pre-norm blocks of causal
self-attention and a 4x GELU MLP, a final LayerNorm and a linear head. The layout and initialisation follow
minGPT (normal(0, 0.02) weights, the residual projections scaled by 1/sqrt(2 n_layer)), so `gpt_nano` has
minGPT's gpt-nano shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTShape:
    n_layer: int
    n_head: int
    n_embd: int


SHAPES = {"gpt_nano": GPTShape(3, 3, 48), "gpt_micro": GPTShape(4, 4, 128)}


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.n_head = shape.n_head
        self.qkv = nn.Linear(shape.n_embd, 3 * shape.n_embd)
        self.proj = nn.Linear(shape.n_embd, shape.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.n_embd)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.n_embd)
        self.fc = nn.Linear(shape.n_embd, 4 * shape.n_embd)
        self.proj = nn.Linear(4 * shape.n_embd, shape.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """logits = GPT(tokens): (batch, length) int64 tokens -> (batch, length, vocab_size) next-token logits."""

    def __init__(self, shape: GPTShape, vocab_size: int, block_size: int):
        super().__init__()
        if shape.n_embd % shape.n_head:
            raise ValueError(f"n_embd {shape.n_embd} is not a multiple of n_head {shape.n_head}")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, shape.n_embd)
        self.wpe = nn.Embedding(block_size, shape.n_embd)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.n_embd)
        self.head = nn.Linear(shape.n_embd, vocab_size, bias=False)
        for name, p in self.named_parameters():  # minGPT's initialisation
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * shape.n_layer))
            elif name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.block_size:
            raise ValueError(f"a sequence of {length} tokens is longer than the block size {self.block_size}")
        x = self.wte(tokens) + self.wpe(torch.arange(length, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The prompt followed by new_tokens tokens, each the most likely next one (argmax)."""
        tokens = prompt
        for _ in range(new_tokens):
            nxt = self(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens[:, prompt.shape[1]:]


def gpt(name: str, vocab_size: int, block_size: int) -> GPT:
    return GPT(SHAPES[name], vocab_size, block_size)
