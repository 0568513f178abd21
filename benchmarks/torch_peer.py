"""The default model written as a minimal nanoGPT-style PyTorch script: the speed peer of configs/base.py.

    python3.11 -m venv /tmp/torchv && /tmp/torchv/bin/pip install torch==2.13.0 numpy
    /tmp/torchv/bin/python benchmarks/torch_peer.py                   # eager and torch.compile
    /tmp/torchv/bin/python benchmarks/torch_peer.py --modes=eager --layers=4 --d_model=256

Same model as configs/base.py: byte embedding of 384 rows tied to the output (logits scaled by
d_model**-0.5, the padded rows dropped), pre-norm RMSNorm, RoPE (rotate-half), causal SDPA, SwiGLU of
width round(8/3 d / 64) * 64, no biases; AdamW (b2 0.95, decay 0.1 on matrices only) behind global-norm
clipping at 1.0; f32. It trains on random byte windows (speed only, no data pipeline) and reports the
median step time over --steps steps after --warmup, for each mode. This file needs only torch and numpy,
so it is not imported by the package or its tests.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--modes", default="eager,compile")
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
  return p.parse_args()


def mlp_dim(d_model: int) -> int:
  return max(64, int(round(8 * d_model / 3 / 64)) * 64)


class RMSNorm(torch.nn.Module):
  def __init__(self, d: int, eps: float = 1e-6):
    super().__init__()
    self.scale = torch.nn.Parameter(torch.ones(d))
    self.eps = eps

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rope(x, cos, sin):
  """x [B, H, T, D] rotate-half RoPE."""
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(torch.nn.Module):
  def __init__(self, d: int, heads: int):
    super().__init__()
    self.heads = heads
    self.mixer_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
    self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
    self.out = torch.nn.Linear(d, d, bias=False)
    hidden = mlp_dim(d)
    self.wi = torch.nn.Linear(d, 2 * hidden, bias=False)
    self.wo = torch.nn.Linear(hidden, d, bias=False)

  def forward(self, x, cos, sin):
    b, t, d = x.shape
    q, k, v = self.qkv(self.mixer_norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
    x = x + self.out(o.transpose(1, 2).reshape(b, t, d))
    gate, up = self.wi(self.mlp_norm(x)).chunk(2, dim=-1)
    return x + self.wo(F.silu(gate) * up)


class ByteLM(torch.nn.Module):
  def __init__(self, layers: int, d: int, heads: int, rows: int = 384, vocab: int = 259):
    super().__init__()
    self.vocab, self.d = vocab, d
    self.embed = torch.nn.Embedding(rows, d)
    self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
    self.final_norm = RMSNorm(d)
    head_dim = d // heads
    self.register_buffer("inv_freq", 10_000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim))

  def forward(self, ids):
    angles = torch.arange(ids.shape[1], dtype=torch.float32)[:, None] * self.inv_freq
    cos, sin = angles.cos(), angles.sin()
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x, cos, sin)
    logits = self.final_norm(x) @ self.embed.weight.t() * self.d ** -0.5
    return logits[..., :self.vocab]


def _optimizer(model):
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
  rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
  return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                           lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def _time(mode: str, args) -> float:
  torch.manual_seed(0)
  model = ByteLM(args.layers, args.d_model, args.heads)
  optimizer = _optimizer(model)

  def step(ids, targets):
    loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss

  forward_backward = torch.compile(step) if mode == "compile" else step
  times = []
  for i in range(args.warmup + args.steps):
    ids = torch.randint(3, 259, (args.batch, args.seq_len + 1))
    start = time.perf_counter()
    forward_backward(ids[:, :-1], ids[:, 1:]).item()
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  args = _parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  params = sum(p.numel() for p in ByteLM(args.layers, args.d_model, args.heads).parameters())
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {params:,} params; "
        f"batch {args.batch} x {args.seq_len} bytes")
  for mode in args.modes.split(","):
    seconds = _time(mode, args)
    print(f"{mode}: {1e3 * seconds:.1f} ms / step, {args.batch * args.seq_len / seconds:,.0f} bytes/s "
          f"(median of {args.steps} steps after {args.warmup} warm-up)")


if __name__ == "__main__":
  main()
