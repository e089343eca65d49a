"""A compact PyTorch twin of ardiff's decoder and its AR / BD3 training steps, for train_throughput.py.

Same architecture and parameter count as ``ardiff.model.Transformer`` (RMSNorm, rotate-half RoPE, SwiGLU, untied
head). Attention is ``F.scaled_dot_product_attention`` with a precomputed boolean mask (BD3-LM's CPU path: the 2L
``[x_t ; x_0]`` mask built once, as the reference's block mask is). Shapes: ``x`` is ``[batch, length, embed]``,
attention operands ``[batch, heads, length, head_dim]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ardiff import masks


class _Layer(nn.Module):
  def __init__(self, d, heads, mlp):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
    self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
    self.gate, self.up = nn.Linear(d, mlp, bias=False), nn.Linear(d, mlp, bias=False)
    self.down = nn.Linear(mlp, d, bias=False)

  def attention(self, x, cos, sin, mask):
    b, t, d = x.shape
    split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.o(out.transpose(1, 2).reshape(b, t, d))

  def mlp(self, x):
    return self.down(F.silu(self.gate(x)) * self.up(x))

  def forward(self, x, cos, sin, mask):
    x = x + self.attention(rms(x, self.norm1), cos, sin, mask)
    return x + self.mlp(rms(x, self.norm2))


def rms(x, w, eps=1e-5):
  return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, cos, sin):
  half = x.shape[-1] // 2
  return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rope_tables(positions, head_dim, theta=10000.0):
  inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
  f = positions.float()[:, None] * inv
  emb = torch.cat([f, f], dim=-1)
  return emb.cos(), emb.sin()


class Twin(nn.Module):
  def __init__(self, s, vocab):
    super().__init__()
    self.embed = nn.Embedding(vocab, s.d)
    self.layers = nn.ModuleList(_Layer(s.d, s.heads, s.mlp) for _ in range(s.layers))
    self.norm = nn.Parameter(torch.ones(s.d))
    self.head = nn.Linear(s.d, vocab, bias=False)
    for p in self.parameters():
      if p.dim() > 1:
        nn.init.normal_(p, std=0.02)

  def forward(self, tokens, cos, sin, mask, logits_len):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x, cos, sin, mask)
    return self.head(rms(x[:, :logits_len], self.norm))


def num_params(s, vocab) -> int:
  return sum(p.numel() for p in Twin(s, vocab).parameters())


def _nll(logits, targets, mask_id):
  logits = logits.float().clone()
  logits[..., mask_id] = -math.inf  # SUBS: [MASK] is never predicted (as ardiff's log_probs)
  return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(
      targets.shape)


def train_step(s, kind, *, vocab, mask_id, block):
  """A zero-arg callable: one forward + backward + AdamW step of the AR or BD3 objective."""
  torch.manual_seed(0)
  model = Twin(s, vocab)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
  tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (s.batch, s.seq)).astype(np.int64))
  hd = s.d // s.heads
  if kind == "AR":
    cos, sin = rope_tables(torch.arange(s.seq), hd)
    mask = torch.from_numpy(masks.Causal().dense(s.seq, s.seq))

    def loss_fn():
      logits = model(tokens, cos, sin, mask, s.seq - 1)
      return _nll(logits, tokens[:, 1:], mask_id).mean()
  else:
    pos = torch.arange(s.seq)
    cos, sin = rope_tables(torch.cat([pos, pos]), hd)
    mask = torch.from_numpy(masks.BD3(s.seq, block).dense(2 * s.seq, 2 * s.seq))
    gen = torch.Generator().manual_seed(1)

    def loss_fn():
      t = torch.rand(s.batch, s.seq // block, generator=gen).repeat_interleave(block, dim=1) * 0.999 + 1e-3
      noised = torch.rand(s.batch, s.seq, generator=gen) < t
      x_t = torch.where(noised, torch.full_like(tokens, mask_id), tokens)
      logits = model(torch.cat([x_t, tokens], dim=1), cos, sin, mask, s.seq)  # noisy half only
      nll = _nll(logits, tokens, mask_id)
      return (nll * noised / t).sum() / tokens.numel()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    opt.step()
    return None
  return step


def components(s, kind, *, vocab, mask_id, block) -> dict:
  """name -> zero-arg callable: attention, MLP, loss (head + log-softmax + NLL), optimizer; forward + backward."""
  torch.manual_seed(0)
  positions = s.seq if kind == "AR" else 2 * s.seq
  hd = s.d // s.heads
  mask = torch.from_numpy((masks.Causal() if kind == "AR" else masks.BD3(s.seq, block)).dense(positions, positions))
  q, k, v = (torch.randn(s.batch, s.heads, positions, hd, requires_grad=True) for _ in range(3))
  layer = _Layer(s.d, s.heads, s.mlp)
  x = torch.randn(s.batch, positions, s.d, requires_grad=True)
  h = torch.randn(s.batch, s.seq, s.d, requires_grad=True)
  head = nn.Linear(s.d, vocab, bias=False)
  targets = torch.randint(0, 256, (s.batch, s.seq))
  model = Twin(s, vocab)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
  for p in model.parameters():
    p.grad = torch.ones_like(p)

  def attn():
    for _ in range(s.layers):
      F.scaled_dot_product_attention(q, k, v, attn_mask=mask).pow(2).sum().backward()

  def mlp():
    for _ in range(s.layers):
      layer.mlp(x).pow(2).sum().backward()

  def loss():
    _nll(head(h), targets, mask_id).sum().backward()

  return {"attention": attn, "MLP": mlp, "loss": loss, "optimizer": opt.step}
