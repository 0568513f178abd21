"""Kernel-side layout of the flash-style Pallas kernels (`ops.attention`, `ops.landmark`): the padded,
transposed operands their `pallas_call`s take and the way back to the caller's layout.

Plain XLA around the kernels (the `pallas_call`s, their grids and BlockSpecs are in each package's
`pallas_tpu.py` / `pallas_gpu.py`). Both layouts put a head's sequence in the rows of a 2-D [L, D] slab,
[B, H, L, D], pad T and S to whole tiles and give padded query rows and padded keys segment ids that match
nothing (`Q_PAD_SEGMENT`, `KV_PAD_SEGMENT`), so padding is invisible and padded rows are sliced off. The
backward reduces per-query-head key (and key-bias) gradients over each GQA group.
  `TpuFlashLayout` (Mosaic TPU): sequence operands [B, Tp, 1] and [B, 1, Sp], bias [B, Hb, 1, Sp].
  `GpuFlashLayout` (Triton): head dim zero-padded to a power of two Dp (zero columns change no dot
    product), sequence operands [B, Tp] and [B, Sp], bias [B, Hb, Sp]; a subclass may place key slots
    differently (the landmark kernel spreads its blocks).
"""

import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops.pallas_common import MIN_TILE
from ops.tiling import pad_axis, round_up

F32 = jnp.float32
Q_PAD_SEGMENT = -1  # segment id of padded query rows
KV_PAD_SEGMENT = -2  # segment id of padded keys: matches no query, padded or not


def default_segments(q_seg, kv_seg, b: int, t: int, s: int):
  """(q_seg, kv_seg): the given ones, or all-zero [B, T], [B, S] int32 segments when q_seg is None."""
  if q_seg is None:
    return jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
  return q_seg, kv_seg


def delta(do, o):
  """D_i = <dO_i, o_i> [B, T, H, 1] f32, the row term of the softmax Jacobian in both ops' backward."""
  return jnp.sum(do.astype(F32) * o.astype(F32), axis=-1, keepdims=True)


def _key_bias_grad(db, bias, lay):
  """The key-bias cotangent [B, Hb, S] from per-query-head db [B, H, S]: summed over each GQA group, and
  over every kv head when one bias row (Hb = 1) is shared by all of them."""
  db = db.reshape(lay.b, lay.hkv, lay.group, lay.s).sum(axis=2)
  if bias.shape[1] == 1:  # one bias row shared by every kv head
    db = jnp.sum(db, axis=1, keepdims=True)
  return db.astype(bias.dtype)


def table_grad(dt, table):
  """The relative-bias table's cotangent [H, num_buckets] from the attention dK/dV kernels' per-(b, h, kv
  block) rows [B, H, nk, 1, W] (lane n < num_buckets of a row holds that block's sum for bucket n)."""
  return jnp.sum(dt, axis=(0, 2))[:, 0, :table.shape[1]].astype(table.dtype)


class TpuFlashLayout:
  """Padded, transposed ([B, H, L, D]) operands of the Mosaic TPU kernels.

  Sequence operands are [B, Tp, 1] (queries) and [B, 1, Sp] (keys); padded keys get position
  `kv_pos_pad` and segment KV_PAD_SEGMENT. `bias` ([B, Hb, S], Hb in {1, Hkv}) is optional; when given it
  follows the four sequence operands, as [B, Hb, 1, Sp].
  """

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk, *, bias=None, kv_pos_pad=0):
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    self.b, self.t, self.h, self.d, self.s, self.hkv = b, t, h, d, s, hkv
    self.group = h // hkv
    self.bq, self.bk = bq, bk
    self.tp, self.sp = round_up(t, bq), round_up(s, bk)
    self.nq, self.nk = self.tp // bq, self.sp // bk
    q_seg, kv_seg = default_segments(q_seg, kv_seg, b, t, s)
    self.seq_operands = [
        pad_axis(q_pos, 1, self.tp)[:, :, None],
        pad_axis(q_seg, 1, self.tp, Q_PAD_SEGMENT)[:, :, None],
        pad_axis(kv_pos, 1, self.sp, kv_pos_pad)[:, None, :],
        pad_axis(kv_seg, 1, self.sp, KV_PAD_SEGMENT)[:, None, :],
    ]
    self.bias = None if bias is None else pad_axis(bias, 2, self.sp)[:, :, None, :]  # [B, Hb, 1, Sp]

  def seq_args(self):
    """Positions and segments of queries and keys, then the bias if any."""
    return self.seq_operands + ([] if self.bias is None else [self.bias])

  def q_major(self, x):
    """[B, T, H, D] -> [B, H, Tp, D]."""
    return jnp.swapaxes(pad_axis(x, 1, self.tp), 1, 2)

  def kv_major(self, x):
    """[B, S, Hkv, D] -> [B, Hkv, Sp, D]."""
    return jnp.swapaxes(pad_axis(x, 1, self.sp), 1, 2)

  def q_unpad(self, x):
    """Inverse of `q_major`: [B, H, Tp, D] -> [B, T, H, D]."""
    return jnp.swapaxes(x, 1, 2)[:, :self.t]

  def backward_operands(self, q, k, v, do, o, lse):
    """(q, k, v, dO, lse, D) in kernel layout for both backward kernels (dO cast to q.dtype)."""
    do = do.astype(q.dtype)
    return (self.q_major(q), self.kv_major(k), self.kv_major(v), self.q_major(do), lse,
            self.q_major(delta(do, o)))

  def key_bias_grad(self, db, bias):
    """`bias`'s cotangent from the dK/dV kernel's per-query-head [B, H, 1, Sp] output."""
    return _key_bias_grad(db[:, :, 0, :self.s], bias, self)

  def per_kv_head(self, x):
    """[B, H, Sp, D] per query head -> [B, S, Hkv, D] summed over each GQA group."""
    x = x.reshape(self.b, self.hkv, self.group, self.sp, self.d).sum(axis=2)
    return jnp.swapaxes(x, 1, 2)[:, :self.s]


class GpuFlashLayout:
  """Padded, transposed ([B, H, L, Dp]) operands of the Triton kernels.

  The head dim is zero-padded to a power of two Dp >= MIN_TILE. Sequence operands are [B, Tp] and [B, Sp];
  padded keys get position `kv_pos_pad` and segment KV_PAD_SEGMENT. `bias` ([B, Hb, S]) is optional and
  follows the four sequence operands as [B, Hb, Sp]. Key slots: by default slot j of the input is slot j
  of the kernel (Sp = S rounded up to bk); a subclass may place them differently by overriding
  `padded_kv_len`, `kv_seq`, `kv_major` and `kv_unpad`.
  """

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk, *, bias=None, kv_pos_pad=0):
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    self.b, self.t, self.h, self.d, self.s, self.hkv = b, t, h, d, s, hkv
    self.group = h // hkv
    self.dp = max(MIN_TILE, pl.next_power_of_2(d))
    self.bq, self.bk = bq, bk
    self.tp, self.sp = round_up(t, bq), self.padded_kv_len()
    self.nq, self.nk = self.tp // bq, self.sp // bk
    q_seg, kv_seg = default_segments(q_seg, kv_seg, b, t, s)
    self.seq_operands = [pad_axis(q_pos, 1, self.tp), pad_axis(q_seg, 1, self.tp, Q_PAD_SEGMENT),
                         self.kv_seq(kv_pos, kv_pos_pad), self.kv_seq(kv_seg, KV_PAD_SEGMENT)]
    self.bias = None if bias is None else pad_axis(bias, 2, self.sp)  # [B, Hb, Sp]

  def seq_args(self):
    """Positions and segments of queries and keys, then the bias if any."""
    return self.seq_operands + ([] if self.bias is None else [self.bias])

  def padded_kv_len(self) -> int:
    """Sp, the number of key slots of the kernel (a multiple of bk)."""
    return round_up(self.s, self.bk)

  def kv_seq(self, x, value=0):
    """[B, S] key positions / segments -> [B, Sp], `value` on the padding."""
    return pad_axis(x, 1, self.sp, value)

  def q_major(self, x):
    """[B, T, H, D] -> [B, H, Tp, Dp]."""
    return jnp.swapaxes(pad_axis(pad_axis(x, 1, self.tp), 3, self.dp), 1, 2)

  def kv_major(self, x):
    """[B, S, Hkv, D] -> [B, Hkv, Sp, Dp]."""
    return jnp.swapaxes(pad_axis(pad_axis(x, 1, self.sp), 3, self.dp), 1, 2)

  def rows(self, x):
    """[B, T, H, 1] row statistics -> [B, H, Tp]."""
    return jnp.swapaxes(pad_axis(x, 1, self.tp), 1, 2)[..., 0]

  def q_unpad(self, x):
    """Inverse of `q_major`: [B, H, Tp, Dp] -> [B, T, H, D]."""
    return jnp.swapaxes(x, 1, 2)[:, :self.t, :, :self.d]

  def kv_unpad(self, x):
    """[B, Sp, Hkv, Dp] per kernel slot -> [B, S, Hkv, D]."""
    return x[:, :self.s, :, :self.d]

  def backward_operands(self, q, k, v, do, o, lse):
    """(q, k, v, dO, lse, D) in kernel layout for both backward kernels (dO cast to q.dtype)."""
    do = do.astype(q.dtype)
    return (self.q_major(q), self.kv_major(k), self.kv_major(v), self.q_major(do), lse,
            self.rows(delta(do, o)))

  def key_bias_grad(self, db, bias):
    """`bias`'s cotangent from the dK/dV kernel's per-query-head [B, H, Sp] output."""
    return _key_bias_grad(db[:, :, :self.s], bias, self)

  def per_kv_head(self, x):
    """[B, H, Sp, Dp] per query head -> [B, S, Hkv, D] summed over each GQA group."""
    x = x.reshape(self.b, self.hkv, self.group, self.sp, self.dp).sum(axis=2)
    return self.kv_unpad(jnp.swapaxes(x, 1, 2))
