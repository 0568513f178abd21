"""Pieces shared by the Pallas kernels of the op packages (attention, landmark, gla) and their wrappers.

The kernels themselves and their maths stay in each package (`pallas_tpu.py`, `pallas_gpu.py`,
`tile_math.py`); this module holds what is the same for all of them:
  * integer tiling arithmetic (`pow2`, `pow2_at_least`; `cdiv`, `round_up` and `pad_axis` come from
    `ops.tiling`, shared with the "xla" implementations, and are re-exported), the segment ids
    of padded query rows and keys (`Q_PAD_SEGMENT`, `KV_PAD_SEGMENT`, which match nothing), and the
    interpret / compiler parameters of each backend;
  * in-kernel helpers of the flash-style kernels: `any_mask`, `split_refs` and the per-tile `finalize`,
    `matmul_tn`, `matmul_nn` (re-exported by the packages' `tile_math`);
  * the layouts of the two flash-style ops (`ops.attention`, `ops.landmark`), whose kernels share their
    grids: `TpuFlashLayout` (Mosaic TPU, grid (b, h, outer, inner), the reduction innermost) and
    `GpuFlashLayout` (Triton lowering, grid (b, h, block), the reduction a `fori_loop` in the kernel).
    A layout pads and transposes the operands to [B, H, L, D], builds the BlockSpecs, runs the three
    `pallas_call`s (forward, dK/dV, dQ) for the kernels it is given, and sums per-query-head key
    (and key-bias) gradients over each GQA group. What differs between the ops is a parameter (the
    padding position of keys, the key bias) or, for the landmark GPU layout's spread key slots, an
    overridden hook.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from ops.tiling import cdiv, pad_axis, round_up  # noqa: F401  (re-exported)

F32 = jnp.float32
Q_PAD_SEGMENT = -1  # segment id of padded query rows
KV_PAD_SEGMENT = -2  # segment id of padded keys: matches no query, padded or not
MIN_TILE = 16  # Triton's smallest dot tile


def pow2(x: int) -> int:
  """The smallest power of two >= x (1 for x <= 1)."""
  return 1 << (max(x, 1) - 1).bit_length()


def pow2_at_least(x: int) -> int:
  """A power-of-two Triton tile covering x: pow2(x), at least MIN_TILE."""
  return max(MIN_TILE, pow2(x))


def default_segments(q_seg, kv_seg, b: int, t: int, s: int):
  """(q_seg, kv_seg): the given ones, or all-zero [B, T], [B, S] int32 segments when q_seg is None."""
  if q_seg is None:
    return jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
  return q_seg, kv_seg


def tpu_interpret_params(interpret: bool):
  """`interpret` argument of a Mosaic TPU `pallas_call`: the TPU interpreter on CPU, or compiled."""
  return pltpu.InterpretParams() if interpret else False


def tpu_compiler_params(grid_rank: int):
  """Mosaic params for a grid whose last axis is the sequential reduction and the others parallel."""
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * (grid_rank - 1) + ("arbitrary",))


def triton_compiler_params(head_dim: int):
  return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


# ---- In-kernel helpers (plain jnp on one tile). ----


def any_mask(mask: jax.Array) -> jax.Array:
  """Whether a bool tile has any True (a float max rather than a bool reduction: Mosaic lowers float
  reductions everywhere)."""
  return jnp.max(jnp.where(mask, 1.0, 0.0)) > 0.0


def split_refs(refs, has_bias: bool):
  """(bias_ref or None, the remaining refs) of a kernel whose optional bias ref comes first."""
  if has_bias:
    return refs[0], refs[1:]
  return None, refs


def finalize(m, l, acc) -> tuple[jax.Array, jax.Array]:
  """(o [bq, D] f32, lse [bq, 1]) from the online-softmax state; rows with l = 0 (nothing in the
  normaliser) give o = 0 and lse = 0."""
  has_key = l > 0.0
  l_safe = jnp.where(has_key, l, 1.0)
  return acc / l_safe, jnp.where(has_key, m + jnp.log(l_safe), 0.0)


def matmul_tn(x, y) -> jax.Array:
  """x^T y in f32: x [n, a], y [n, b] -> [a, b]."""
  return jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def matmul_nn(x, y) -> jax.Array:
  """x y in f32: x [a, n], y [n, b] -> [a, b]."""
  return jax.lax.dot_general(x, y, (((1,), (0,)), ((), ())), preferred_element_type=F32)


# ---- Layouts of the flash-style kernels (ops.attention, ops.landmark). ----


def _delta(do, o):
  """D_i = <dO_i, o_i> [B, T, H, 1] f32, the row term of the softmax Jacobian in both ops' backward."""
  return jnp.sum(do.astype(F32) * o.astype(F32), axis=-1, keepdims=True)


def _key_bias_grad(db, bias, lay):
  """The key-bias cotangent [B, Hb, S] from per-query-head db [B, H, S]: summed over each GQA group, and
  over every kv head when one bias row (Hb = 1) is shared by all of them."""
  db = db.reshape(lay.b, lay.hkv, lay.group, lay.s).sum(axis=2)
  if bias.shape[1] == 1:  # one bias row shared by every kv head
    db = jnp.sum(db, axis=1, keepdims=True)
  return db.astype(bias.dtype)


class TpuFlashLayout:
  """Padded, transposed ([B, H, L, D]) kernel operands, BlockSpecs and calls of the Mosaic TPU kernels.

  Grid axes are (b, h, x, y); `q_axis` says which of x, y (2 or 3) indexes query blocks, kv the other.
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

  def q_major(self, x):
    """[B, T, H, D] -> [B, H, Tp, D]."""
    return jnp.swapaxes(pad_axis(x, 1, self.tp), 1, 2)

  def kv_major(self, x):
    """[B, S, Hkv, D] -> [B, Hkv, Sp, D]."""
    return jnp.swapaxes(pad_axis(x, 1, self.sp), 1, 2)

  def q_unpad(self, x):
    """Inverse of `q_major`: [B, H, Tp, D] -> [B, T, H, D]."""
    return jnp.swapaxes(x, 1, 2)[:, :self.t]

  def specs(self, q_axis: int):
    """(seq specs, q, kv, row, per-query-head key, per-query-head key-row specs) for a grid whose
    query-block index is grid axis q_axis (2 or 3), kv the other one."""
    sq = pl.squeezed
    g, bq, bk, d = self.group, self.bq, self.bk, self.d

    def qi(idx):
      return idx[q_axis]

    def kj(idx):
      return idx[5 - q_axis]

    seq = [pl.BlockSpec((sq, bq, 1), lambda *i: (i[0], qi(i), 0)),
           pl.BlockSpec((sq, bq, 1), lambda *i: (i[0], qi(i), 0)),
           pl.BlockSpec((sq, 1, bk), lambda *i: (i[0], 0, kj(i))),
           pl.BlockSpec((sq, 1, bk), lambda *i: (i[0], 0, kj(i)))]
    if self.bias is not None:
      shared = self.bias.shape[1] == 1
      seq.append(pl.BlockSpec((sq, sq, 1, bk),
                              lambda *i: (i[0], 0 if shared else i[1] // g, 0, kj(i))))
    q_spec = pl.BlockSpec((sq, sq, bq, d), lambda *i: (i[0], i[1], qi(i), 0))
    kv_spec = pl.BlockSpec((sq, sq, bk, d), lambda *i: (i[0], i[1] // g, kj(i), 0))
    row_spec = pl.BlockSpec((sq, sq, bq, 1), lambda *i: (i[0], i[1], qi(i), 0))
    key_spec = pl.BlockSpec((sq, sq, bk, d), lambda *i: (i[0], i[1], kj(i), 0))
    key_row_spec = pl.BlockSpec((sq, sq, 1, bk), lambda *i: (i[0], i[1], 0, kj(i)))
    return seq, q_spec, kv_spec, row_spec, key_spec, key_row_spec

  def seq_args(self):
    return self.seq_operands + ([] if self.bias is None else [self.bias])

  def forward(self, kernel, q, k, v, interpret: bool):
    """Runs the forward kernel on grid (b, h, q block, kv block): (o [B, T, H, D], lse [B, H, Tp, 1]).

    The kernel takes the sequence refs, q, k, v, then o, lse and the VMEM scratch m, l [bq, 1], acc
    [bq, D] f32."""
    seq, q_spec, kv_spec, row_spec, _, _ = self.specs(q_axis=2)
    o, lse = pl.pallas_call(
        kernel,
        grid=(self.b, self.h, self.nq, self.nk),
        in_specs=seq + [q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((self.b, self.h, self.tp, self.d), q.dtype),
                   jax.ShapeDtypeStruct((self.b, self.h, self.tp, 1), F32)],
        scratch_shapes=[pltpu.VMEM((self.bq, 1), F32), pltpu.VMEM((self.bq, 1), F32),
                        pltpu.VMEM((self.bq, self.d), F32)],
        compiler_params=tpu_compiler_params(4),
        interpret=tpu_interpret_params(interpret),
    )(*self.seq_args(), self.q_major(q), self.kv_major(k), self.kv_major(v))
    return self.q_unpad(o), lse

  def backward_operands(self, q, k, v, do, o, lse):
    """(q, k, v, dO, lse, D) in kernel layout for both backward kernels (dO cast to q.dtype)."""
    do = do.astype(q.dtype)
    delta = _delta(do, o)
    return (self.q_major(q), self.kv_major(k), self.kv_major(v), self.q_major(do), lse,
            self.q_major(delta))

  def dkv(self, kernel, operands, interpret: bool, *, bias_grad: bool = False,
          bias_scratch: bool = False):
    """Runs the dK/dV kernel on grid (b, h, kv block, q block): per-query-head f32 dk, dv
    [B, H, Sp, D] (and the key-bias gradient [B, H, 1, Sp] with `bias_grad`).

    Scratch: dk, dv [bk, D] f32, plus a [1, bk] f32 bias accumulator with `bias_scratch`."""
    seq, q_spec, kv_spec, row_spec, key_spec, key_row_spec = self.specs(q_axis=3)
    out_shape = [jax.ShapeDtypeStruct((self.b, self.h, self.sp, self.d), F32)] * 2
    out_specs = [key_spec, key_spec]
    if bias_grad:
      out_shape.append(jax.ShapeDtypeStruct((self.b, self.h, 1, self.sp), F32))
      out_specs.append(key_row_spec)
    scratch = [pltpu.VMEM((self.bk, self.d), F32), pltpu.VMEM((self.bk, self.d), F32)]
    if bias_scratch:
      scratch.append(pltpu.VMEM((1, self.bk), F32))
    return pl.pallas_call(
        kernel,
        grid=(self.b, self.h, self.nk, self.nq),
        in_specs=seq + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=tpu_compiler_params(4),
        interpret=tpu_interpret_params(interpret),
    )(*self.seq_args(), *operands)

  def dq(self, kernel, operands, interpret: bool):
    """Runs the dQ kernel on grid (b, h, q block, kv block): dq [B, T, H, D] f32 (scratch [bq, D])."""
    seq, q_spec, kv_spec, row_spec, _, _ = self.specs(q_axis=2)
    dq = pl.pallas_call(
        kernel,
        grid=(self.b, self.h, self.nq, self.nk),
        in_specs=seq + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((self.b, self.h, self.tp, self.d), F32),
        scratch_shapes=[pltpu.VMEM((self.bq, self.d), F32)],
        compiler_params=tpu_compiler_params(4),
        interpret=tpu_interpret_params(interpret),
    )(*self.seq_args(), *operands)
    return self.q_unpad(dq)

  def key_bias_grad(self, db, bias):
    """`bias`'s cotangent from the dK/dV kernel's [B, H, 1, Sp] output (see `_key_bias_grad`)."""
    return _key_bias_grad(db[:, :, 0, :self.s], bias, self)

  def per_kv_head(self, x):
    """[B, H, Sp, D] per query head -> [B, S, Hkv, D] summed over each GQA group."""
    x = x.reshape(self.b, self.hkv, self.group, self.sp, self.d).sum(axis=2)
    return jnp.swapaxes(x, 1, 2)[:, :self.s]


class GpuFlashLayout:
  """Padded, transposed ([B, H, L, Dp]) kernel operands, BlockSpecs and calls of the Triton kernels.

  Grids are (b, h, block); the head dim is zero-padded to a power of two Dp (zero columns change no dot
  product). Sequence operands are [B, Tp] and [B, Sp]; padded keys get position `kv_pos_pad` and segment
  KV_PAD_SEGMENT. `bias` ([B, Hb, S]) is optional and follows the four sequence operands as [B, Hb, Sp].
  Key slots: by default slot j of the input is slot j of the kernel (Sp = S rounded up to bk); a subclass
  may place them differently by overriding `padded_kv_len`, `kv_seq`, `kv_major` and `kv_unpad`.
  """

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk, *, bias=None, kv_pos_pad=0):
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    self.b, self.t, self.h, self.d, self.s, self.hkv = b, t, h, d, s, hkv
    self.group = h // hkv
    self.dp = pow2_at_least(d)
    self.bq, self.bk = bq, bk
    self.tp, self.sp = round_up(t, bq), self.padded_kv_len()
    self.nq, self.nk = self.tp // bq, self.sp // bk
    q_seg, kv_seg = default_segments(q_seg, kv_seg, b, t, s)
    self.seq_operands = [pad_axis(q_pos, 1, self.tp), pad_axis(q_seg, 1, self.tp, Q_PAD_SEGMENT),
                         self.kv_seq(kv_pos, kv_pos_pad), self.kv_seq(kv_seg, KV_PAD_SEGMENT)]
    if bias is not None:
      self.seq_operands.append(pad_axis(bias, 2, self.sp))  # [B, Hb, Sp]
    self.bias_shared = bias is not None and bias.shape[1] == 1

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

  def seq_specs(self, q_block: int | None, kv_block: int | None):
    """Specs of positions, segments (and bias): a block of `*_block` entries or the whole padded length."""
    sq, g = pl.squeezed, self.group
    qb, kb = q_block or self.tp, kv_block or self.sp
    q_index = (lambda b, h, i: (b, i)) if q_block else (lambda b, h, i: (b, 0))
    k_index = (lambda b, h, i: (b, i)) if kv_block else (lambda b, h, i: (b, 0))
    specs = [pl.BlockSpec((sq, qb), q_index)] * 2 + [pl.BlockSpec((sq, kb), k_index)] * 2
    if len(self.seq_operands) == 5:
      shared = self.bias_shared
      specs.append(pl.BlockSpec((sq, sq, kb),
                                lambda b, h, i: (b, 0 if shared else h // g, k_index(b, h, i)[1])))
    return specs

  def tensor_spec(self, length: int, per_kv_head: bool, blocked: bool):
    sq, g = pl.squeezed, self.group
    head = (lambda h: h // g) if per_kv_head else (lambda h: h)
    if blocked:
      return pl.BlockSpec((sq, sq, length, self.dp), lambda b, h, i: (b, head(h), i, 0))
    return pl.BlockSpec((sq, sq, length, self.dp), lambda b, h, i: (b, head(h), 0, 0))

  def row_spec(self, length: int, blocked: bool):
    sq = pl.squeezed
    if blocked:
      return pl.BlockSpec((sq, sq, length), lambda b, h, i: (b, h, i))
    return pl.BlockSpec((sq, sq, length), lambda b, h, i: (b, h, 0))

  def forward(self, kernel, q, k, v, interpret: bool):
    """Runs the forward kernel on grid (b, h, q block): (o [B, T, H, D], lse [B, H, Tp]).

    The kernel sees one q block and the whole k, v of its kv head and loops over key tiles."""
    bq, sp = self.bq, self.sp
    o, lse = pl.pallas_call(
        kernel,
        grid=(self.b, self.h, self.nq),
        in_specs=self.seq_specs(bq, None) + [self.tensor_spec(bq, False, True),
                                             self.tensor_spec(sp, True, False),
                                             self.tensor_spec(sp, True, False)],
        out_specs=[self.tensor_spec(bq, False, True), self.row_spec(bq, True)],
        out_shape=[jax.ShapeDtypeStruct((self.b, self.h, self.tp, self.dp), q.dtype),
                   jax.ShapeDtypeStruct((self.b, self.h, self.tp), F32)],
        compiler_params=triton_compiler_params(self.dp),
        interpret=interpret,
    )(*self.seq_operands, self.q_major(q), self.kv_major(k), self.kv_major(v))
    return self.q_unpad(o), lse

  def backward_operands(self, q, k, v, do, o, lse):
    """(q, k, v, dO, lse, D) in kernel layout for both backward kernels (dO cast to q.dtype)."""
    do = do.astype(q.dtype)
    delta = _delta(do, o)
    return (self.q_major(q), self.kv_major(k), self.kv_major(v), self.q_major(do), lse,
            self.rows(delta))

  def dkv(self, kernel, operands, interpret: bool, *, bias_grad: bool = False):
    """Runs the dK/dV kernel on grid (b, h, kv tile): per-query-head f32 dk, dv [B, H, Sp, Dp] (and
    the key-bias gradient [B, H, Sp] with `bias_grad`). The kernel loops over the q blocks."""
    bk, tp = self.bk, self.tp
    out_shape = [jax.ShapeDtypeStruct((self.b, self.h, self.sp, self.dp), F32)] * 2
    out_specs = [self.tensor_spec(bk, False, True)] * 2
    if bias_grad:
      out_shape.append(jax.ShapeDtypeStruct((self.b, self.h, self.sp), F32))
      out_specs.append(self.row_spec(bk, True))
    return pl.pallas_call(
        kernel,
        grid=(self.b, self.h, self.nk),
        in_specs=self.seq_specs(None, bk) + [self.tensor_spec(tp, False, False),
                                             self.tensor_spec(bk, True, True),
                                             self.tensor_spec(bk, True, True),
                                             self.tensor_spec(tp, False, False),
                                             self.row_spec(tp, False), self.row_spec(tp, False)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=triton_compiler_params(self.dp),
        interpret=interpret,
    )(*self.seq_operands, *operands)

  def dq(self, kernel, operands, interpret: bool):
    """Runs the dQ kernel on grid (b, h, q block): dq [B, T, H, D] f32. The kernel loops over key tiles."""
    bq, sp = self.bq, self.sp
    dq = pl.pallas_call(
        kernel,
        grid=(self.b, self.h, self.nq),
        in_specs=self.seq_specs(bq, None) + [self.tensor_spec(bq, False, True),
                                             self.tensor_spec(sp, True, False),
                                             self.tensor_spec(sp, True, False),
                                             self.tensor_spec(bq, False, True),
                                             self.row_spec(bq, True), self.row_spec(bq, True)],
        out_specs=self.tensor_spec(bq, False, True),
        out_shape=jax.ShapeDtypeStruct((self.b, self.h, self.tp, self.dp), F32),
        compiler_params=triton_compiler_params(self.dp),
        interpret=interpret,
    )(*self.seq_operands, *operands)
    return self.q_unpad(dq)

  def key_bias_grad(self, db, bias):
    """`bias`'s cotangent from the dK/dV kernel's [B, H, Sp] output (see `_key_bias_grad`)."""
    return _key_bias_grad(db[:, :, :self.s], bias, self)

  def per_kv_head(self, x):
    """[B, H, Sp, Dp] per query head -> [B, S, Hkv, D] summed over each GQA group."""
    x = x.reshape(self.b, self.hkv, self.group, self.sp, self.dp).sum(axis=2)
    return self.kv_unpad(jnp.swapaxes(x, 1, 2))
