"""DNA's own attention kernel for PyTorch, in Triton: causal and not, memory
linear in the lengths, gradients in the same block structure.

The algorithm of `keras_dna.ops.pallas` (`docs/algorithms.md`, "A kernel of
our own"), per batch entry and head, with scores `s = scale * q k^T` and
validity `m` (mask, causal rule, padding):

- `_prefix_kernel`, per block of keys: `C[I, j]`, key `j`'s log-sum-exp over
  the valid queries of the blocks before query block `I` (causal), or `c[j]`
  over all of them, each started from the null query's logit;
- `_forward_kernel`, per block of queries: flash attention on `s - c`, with
  `c[i, j]` a cumulative log-sum-exp down each tile's rows from `C[I, j]`
  (causal); the row log-sum-exps are kept for the gradient;
- `_key_gradient_kernel`, per block of keys, the query blocks in reverse:
  the keys' and values' gradients. With `D` the softmax part of the score
  gradient, the scores get `D - exp(s - c) * S`, where
  `S[i, j] = sum over i' >= i of D[i', j] exp(c[i, j] - c[i', j])` (causal;
  every factor at most 1), a reverse scan down the tile plus the carry from
  the blocks after, which is kept per block for the next kernel; without
  causal normalization `S[j]` is the column sum of `D`;
- `_query_gradient_kernel`, per block of queries: the queries' gradient.

Softmax (`normalize=False`) is the same kernels with `c = 0`. Every prefix
is taken in log space (`tl.associative_scan`), exact at any spread of the
scores. Scans run forward only (reversed ones flip the tile), as Triton's
reverse scans were reported wrong on GPUs (triton-lang/triton#4362).

The kernels are compiled for CUDA devices and run in Triton's interpreter
(`TRITON_INTERPRET=1`), exact and slow, on a CPU, where the suite holds them
to the float64 oracle.
"""

import torch
import triton
import triton.language as tl

# A finite stand-in for minus infinity: `NEG - NEG` is 0, never NaN.
NEG = tl.constexpr(-1e30)


@triton.jit
def _logaddexp(a, b):
    top = tl.maximum(a, b)
    return top + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _suffix_combine(later_sum, later_c, sum_, c):
    # The segment of rows [i, end) from row i and the segment [i + 1, end):
    # `S` relative to the first row's `c`, whose factor is at most 1.
    return sum_ + tl.exp(c - later_c) * later_sum, c


@triton.jit
def _scores(q, k_base, mask_base, rows, cols, heads, T, S, H, stride_ks, stride_kh,
            stride_mt, stride_ms, scale, CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr):
    """A tile's scores (`NEG` where not valid) and validity."""
    key_t = tl.load(k_base + cols[None, :] * stride_ks + heads[:, None] * stride_kh,
                    mask=(cols[None, :] < S) & (heads[:, None] < H), other=0.0).to(tl.float32)
    scores = tl.dot(q, key_t, input_precision="ieee") * scale
    valid = (rows[:, None] < T) & (cols[None, :] < S)
    if CAUSAL_MASK:
        valid = valid & (cols[None, :] <= rows[:, None])
    if HAS_MASK:
        allowed = tl.load(mask_base + rows[:, None] * stride_mt + cols[None, :] * stride_ms,
                          mask=valid, other=0)
        valid = valid & (allowed != 0)
    return tl.where(valid, scores, NEG), valid


@triton.jit
def _normalizer(scores, prefix_base, block, cols, S, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr):
    """`c` of a tile: 0 (softmax), `c[j]`, or (causal) the cumulative
    log-sum-exp down the tile from `C[block, j]`."""
    if not NORMALIZE:
        return tl.zeros_like(scores)
    if CAUSAL:
        carry = tl.load(prefix_base + block * S + cols, mask=cols < S, other=NEG)
        return _logaddexp(tl.associative_scan(scores, 0, _logaddexp), carry[None, :])
    total = tl.load(prefix_base + cols, mask=cols < S, other=NEG)
    return tl.zeros_like(scores) + total[None, :]


@triton.jit
def _load_rows(base, rows, heads, T, H, stride_t, stride_h):
    return tl.load(base + rows[:, None] * stride_t + heads[None, :] * stride_h,
                   mask=(rows[:, None] < T) & (heads[None, :] < H), other=0.0).to(tl.float32)


@triton.jit
def _program(bn, N, T, S, prefix_ptr, BLOCK_Q: tl.constexpr, CAUSAL: tl.constexpr):
    """A program's batch entry and head (from its index `bn` over both),
    the number of query blocks, and where its rows of `C` (causal: one per
    query block and the whole prefix) or its row of `c` start."""
    num_blocks = tl.cdiv(T, BLOCK_Q)
    rows = num_blocks + 1 if CAUSAL else 1
    return bn // N, bn % N, num_blocks, prefix_ptr + bn * rows * S


@triton.jit
def _prefix_kernel(
    q_ptr, k_ptr, mask_ptr, null_ptr, prefix_ptr,
    T, S, H, N, scale,
    stride_qb, stride_qt, stride_qn, stride_qh, stride_kb, stride_ks, stride_kn, stride_kh,
    stride_mb, stride_mn, stride_mt, stride_ms,
    CAUSAL: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_NULL: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    key_block, bn = tl.program_id(0), tl.program_id(1)
    b, n, num_blocks, prefix_base = _program(bn, N, T, S, prefix_ptr, BLOCK_Q, CAUSAL)
    cols = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
    heads = tl.arange(0, BLOCK_H)
    q_base = q_ptr + b * stride_qb + n * stride_qn
    k_base = k_ptr + b * stride_kb + n * stride_kn
    mask_base = mask_ptr + b * stride_mb + n * stride_mn
    running = tl.full((BLOCK_K,), NEG, tl.float32)
    if HAS_NULL:
        running = running * 0.0 + tl.load(null_ptr + n)
    first = (key_block * BLOCK_K) // BLOCK_Q if CAUSAL_MASK else 0
    for block in range(0, num_blocks):
        if CAUSAL:
            tl.store(prefix_base + block * S + cols, running, mask=cols < S)
        if block >= first:
            rows = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
            q = _load_rows(q_base, rows, heads, T, H, stride_qt, stride_qh)
            scores, _ = _scores(q, k_base, mask_base, rows, cols, heads, T, S, H, stride_ks, stride_kh,
                                stride_mt, stride_ms, scale, CAUSAL_MASK, HAS_MASK)
            top = tl.max(scores, axis=0)
            total = top + tl.log(tl.sum(tl.exp(scores - top[None, :]), axis=0))
            running = _logaddexp(running, total)
    last = num_blocks if CAUSAL else 0
    tl.store(prefix_base + last * S + cols, running, mask=cols < S)


@triton.jit
def _key_blocks_seen(block, S, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, CAUSAL_MASK: tl.constexpr):
    """How many key blocks query block `block` sees."""
    if CAUSAL_MASK:
        return tl.cdiv(tl.minimum((block + 1) * BLOCK_Q, S), BLOCK_K)
    return tl.cdiv(S, BLOCK_K)


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, prefix_ptr, out_ptr, lse_ptr,
    T, S, H, HV, N, scale,
    stride_qb, stride_qt, stride_qn, stride_qh, stride_kb, stride_ks, stride_kn, stride_kh,
    stride_vb, stride_vs, stride_vn, stride_vh, stride_ob, stride_ot, stride_on, stride_oh,
    stride_mb, stride_mn, stride_mt, stride_ms,
    NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HV: tl.constexpr,
):
    block, bn = tl.program_id(0), tl.program_id(1)
    b, n, num_blocks, prefix_base = _program(bn, N, T, S, prefix_ptr, BLOCK_Q, CAUSAL)
    rows = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    heads, value_heads = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_HV)
    q = _load_rows(q_ptr + b * stride_qb + n * stride_qn, rows, heads, T, H, stride_qt, stride_qh)
    k_base = k_ptr + b * stride_kb + n * stride_kn
    v_base = v_ptr + b * stride_vb + n * stride_vn
    mask_base = mask_ptr + b * stride_mb + n * stride_mn
    top = tl.full((BLOCK_Q,), NEG, tl.float32)
    total = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_HV), tl.float32)
    for key_block in range(0, _key_blocks_seen(block, S, BLOCK_Q, BLOCK_K, CAUSAL_MASK)):
        cols = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
        scores, valid = _scores(q, k_base, mask_base, rows, cols, heads, T, S, H, stride_ks, stride_kh,
                                stride_mt, stride_ms, scale, CAUSAL_MASK, HAS_MASK)
        logits = tl.where(valid, scores - _normalizer(scores, prefix_base, block, cols, S, NORMALIZE, CAUSAL),
                          NEG)
        new_top = tl.maximum(top, tl.max(logits, axis=1))
        weights = tl.where(valid, tl.exp(logits - new_top[:, None]), 0.0)
        rescale = tl.exp(top - new_top)
        value = _load_rows(v_base, cols, value_heads, S, HV, stride_vs, stride_vh)
        acc = acc * rescale[:, None] + tl.dot(weights, value, input_precision="ieee")
        total = total * rescale + tl.sum(weights, axis=1)
        top = new_top
    # Rows without a valid key hold zeros (no division by their empty sum).
    out = tl.where(total[:, None] > 0, acc / tl.maximum(total, 1e-37)[:, None], 0.0)
    tl.store(out_ptr + b * stride_ob + n * stride_on + rows[:, None] * stride_ot + value_heads[None, :] * stride_oh,
             out, mask=(rows[:, None] < T) & (value_heads[None, :] < HV))
    lse = tl.where(total > 0, top + tl.log(tl.maximum(total, 1e-37)), NEG)
    tl.store(lse_ptr + bn * T + rows, lse, mask=rows < T)


@triton.jit
def _tile_gradient(q, do, delta, lse, k_base, v_base, mask_base, prefix_base, block, rows, cols,
                   heads, value_heads, T, S, H, HV, stride_ks, stride_kh, stride_vs, stride_vh,
                   stride_mt, stride_ms, scale,
                   NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                   HAS_MASK: tl.constexpr):
    """A tile's weights `A`, the softmax part `D` of the scores' gradient,
    `B = exp(s - c)` where valid, and `c`."""
    scores, valid = _scores(q, k_base, mask_base, rows, cols, heads, T, S, H, stride_ks, stride_kh,
                            stride_mt, stride_ms, scale, CAUSAL_MASK, HAS_MASK)
    c = _normalizer(scores, prefix_base, block, cols, S, NORMALIZE, CAUSAL)
    # The exponents where valid only: masked lanes of an empty row would overflow.
    weights = tl.where(valid, tl.exp(tl.where(valid, scores - c - lse[:, None], NEG)), 0.0)
    value = _load_rows(v_base, cols, value_heads, S, HV, stride_vs, stride_vh)
    weights_grad = tl.dot(do, tl.trans(value), input_precision="ieee")
    softmax_part = weights * (weights_grad - delta[:, None])
    key_weights = tl.where(valid, tl.exp(scores - c), 0.0)
    return weights, softmax_part, key_weights, c


@triton.jit
def _suffix(softmax_part, c, later, after):
    """`S[i, j] = sum over i' >= i of D[i', j] exp(c[i, j] - c[i', j])`,
    the blocks after entering through their carry `later` (against the
    prefix `after` this block)."""
    flipped, _ = tl.associative_scan((tl.flip(softmax_part, 0), tl.flip(c, 0)), 0, _suffix_combine)
    return tl.flip(flipped, 0) + tl.exp(c - after[None, :]) * later[None, :]


@triton.jit
def _first_row(x, BLOCK_Q: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, BLOCK_Q)[:, None] == 0, x, 0.0), axis=0)


@triton.jit
def _key_gradient_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, prefix_ptr, do_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, later_ptr, start_ptr,
    T, S, H, HV, N, scale,
    stride_qb, stride_qt, stride_qn, stride_qh, stride_kb, stride_ks, stride_kn, stride_kh,
    stride_vb, stride_vs, stride_vn, stride_vh, stride_ob, stride_ot, stride_on, stride_oh,
    stride_mb, stride_mn, stride_mt, stride_ms,
    NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HV: tl.constexpr,
):
    """dK and dV of a key block (`dk_ptr`, `dv_ptr`: `(B, S, N, H)`,
    `(B, S, N, HV)`, strides of `k`, `v`). Causal: the query blocks in
    reverse, each block's carry from the blocks after stored in `later_ptr`
    (`(B, N, num_blocks, S)`), and the carry at the start (the null
    query's share) in `start_ptr`. Not causal: the column sums of `D` in
    `later_ptr` (`(B, N, S)`)."""
    key_block, bn = tl.program_id(0), tl.program_id(1)
    b, n, num_blocks, prefix_base = _program(bn, N, T, S, prefix_ptr, BLOCK_Q, CAUSAL)
    cols = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
    heads, value_heads = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_HV)
    q_base = q_ptr + b * stride_qb + n * stride_qn
    do_base = do_ptr + b * stride_ob + n * stride_on
    k_base = k_ptr + b * stride_kb + n * stride_kn
    v_base = v_ptr + b * stride_vb + n * stride_vn
    mask_base = mask_ptr + b * stride_mb + n * stride_mn
    first = (key_block * BLOCK_K) // BLOCK_Q if CAUSAL_MASK else 0
    key_grad = tl.zeros((BLOCK_K, BLOCK_H), tl.float32)
    weighted_queries = tl.zeros((BLOCK_K, BLOCK_H), tl.float32)
    value_grad = tl.zeros((BLOCK_K, BLOCK_HV), tl.float32)
    carry = tl.zeros((BLOCK_K,), tl.float32)
    for step in range(0, num_blocks - first):
        block = num_blocks - 1 - step
        rows = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q = _load_rows(q_base, rows, heads, T, H, stride_qt, stride_qh)
        do = _load_rows(do_base, rows, value_heads, T, HV, stride_ot, stride_oh)
        lse = tl.load(lse_ptr + bn * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(delta_ptr + bn * T + rows, mask=rows < T, other=0.0)
        weights, softmax_part, key_weights, c = _tile_gradient(
            q, do, delta, lse, k_base, v_base, mask_base, prefix_base, block, rows, cols, heads,
            value_heads, T, S, H, HV, stride_ks, stride_kh, stride_vs, stride_vh, stride_mt, stride_ms,
            scale, NORMALIZE, CAUSAL, CAUSAL_MASK, HAS_MASK)
        value_grad += tl.dot(tl.trans(weights), do, input_precision="ieee")
        scores_grad = softmax_part
        if NORMALIZE:
            if CAUSAL:
                tl.store(later_ptr + (bn * num_blocks + block) * S + cols, carry, mask=cols < S)
                after = tl.load(prefix_base + (block + 1) * S + cols, mask=cols < S, other=NEG)
                suffix = _suffix(softmax_part, c, carry, after)
                scores_grad = softmax_part - key_weights * suffix
                before = tl.load(prefix_base + block * S + cols, mask=cols < S, other=NEG)
                carry = _first_row(tl.exp(before[None, :] - c) * suffix, BLOCK_Q)
            else:
                carry += tl.sum(softmax_part, axis=0)
                weighted_queries += tl.dot(tl.trans(key_weights), q, input_precision="ieee")
        key_grad += tl.dot(tl.trans(scores_grad), q, input_precision="ieee")
    if NORMALIZE:
        if CAUSAL:
            # Blocks before `first` see none of these keys: the carry
            # reaches the start unchanged.
            tl.store(start_ptr + bn * S + cols, carry, mask=cols < S)
        else:
            key_grad -= carry[:, None] * weighted_queries
            tl.store(later_ptr + bn * S + cols, carry, mask=cols < S)
    key_mask = (cols[:, None] < S) & (heads[None, :] < H)
    tl.store(dk_ptr + b * stride_kb + n * stride_kn + cols[:, None] * stride_ks + heads[None, :] * stride_kh,
             key_grad * scale, mask=key_mask)
    tl.store(dv_ptr + b * stride_vb + n * stride_vn + cols[:, None] * stride_vs + value_heads[None, :] * stride_vh,
             value_grad, mask=(cols[:, None] < S) & (value_heads[None, :] < HV))


@triton.jit
def _query_gradient_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, prefix_ptr, do_ptr, lse_ptr, delta_ptr, later_ptr, dq_ptr,
    T, S, H, HV, N, scale,
    stride_qb, stride_qt, stride_qn, stride_qh, stride_kb, stride_ks, stride_kn, stride_kh,
    stride_vb, stride_vs, stride_vn, stride_vh, stride_ob, stride_ot, stride_on, stride_oh,
    stride_mb, stride_mn, stride_mt, stride_ms,
    NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HV: tl.constexpr,
):
    """dQ of a query block (`dq_ptr`: strides of `q`), from the carries the
    key gradient kernel stored in `later_ptr`."""
    block, bn = tl.program_id(0), tl.program_id(1)
    b, n, num_blocks, prefix_base = _program(bn, N, T, S, prefix_ptr, BLOCK_Q, CAUSAL)
    rows = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    heads, value_heads = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_HV)
    q = _load_rows(q_ptr + b * stride_qb + n * stride_qn, rows, heads, T, H, stride_qt, stride_qh)
    do = _load_rows(do_ptr + b * stride_ob + n * stride_on, rows, value_heads, T, HV, stride_ot, stride_oh)
    lse = tl.load(lse_ptr + bn * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(delta_ptr + bn * T + rows, mask=rows < T, other=0.0)
    k_base = k_ptr + b * stride_kb + n * stride_kn
    v_base = v_ptr + b * stride_vb + n * stride_vn
    mask_base = mask_ptr + b * stride_mb + n * stride_mn
    query_grad = tl.zeros((BLOCK_Q, BLOCK_H), tl.float32)
    for key_block in range(0, _key_blocks_seen(block, S, BLOCK_Q, BLOCK_K, CAUSAL_MASK)):
        cols = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
        weights, softmax_part, key_weights, c = _tile_gradient(
            q, do, delta, lse, k_base, v_base, mask_base, prefix_base, block, rows, cols, heads,
            value_heads, T, S, H, HV, stride_ks, stride_kh, stride_vs, stride_vh, stride_mt, stride_ms,
            scale, NORMALIZE, CAUSAL, CAUSAL_MASK, HAS_MASK)
        scores_grad = softmax_part
        if NORMALIZE:
            if CAUSAL:
                later = tl.load(later_ptr + (bn * num_blocks + block) * S + cols, mask=cols < S, other=0.0)
                after = tl.load(prefix_base + (block + 1) * S + cols, mask=cols < S, other=NEG)
                scores_grad = softmax_part - key_weights * _suffix(softmax_part, c, later, after)
            else:
                column_sums = tl.load(later_ptr + bn * S + cols, mask=cols < S, other=0.0)
                scores_grad = softmax_part - key_weights * column_sums[None, :]
        key = _load_rows(k_base, cols, heads, S, H, stride_ks, stride_kh)
        query_grad += tl.dot(scores_grad, key, input_precision="ieee")
    tl.store(dq_ptr + b * stride_qb + n * stride_qn + rows[:, None] * stride_qt + heads[None, :] * stride_qh,
             query_grad * scale, mask=(rows[:, None] < T) & (heads[None, :] < H))


def _power_of_two(n, least):
    return max(least, triton.next_power_of_2(max(n, 1)))


def _strides(x):
    return tuple(x.stride())


class _Call:
    """One call's tensors and static settings, as the kernels take them."""

    def __init__(self, query, key, value, mask, null_logits, normalize, causal, causal_mask, scale,
                 block_q, block_k):
        self.q, self.k, self.v = (x.float().contiguous() for x in (query, key, value))
        self.batch, self.length, self.heads, self.head_dim = self.q.shape
        self.key_length, self.value_dim = self.k.shape[1], self.v.shape[-1]
        self.normalize, self.causal, self.scale = normalize, causal and normalize, float(scale)
        self.causal_mask, self.has_mask = causal_mask, mask is not None
        shape = (self.batch, self.heads, self.length, self.key_length)
        self.mask = (mask.to(torch.int8).expand(shape) if self.has_mask
                     else torch.zeros((1, 1, 1, 1), dtype=torch.int8, device=self.q.device).expand(shape))
        self.null = None if null_logits is None else null_logits.float().reshape(-1).contiguous()
        self.block_q = min(block_q, _power_of_two(self.length, 16))
        self.block_k = min(block_k, _power_of_two(self.key_length, 16))
        self.num_blocks = triton.cdiv(self.length, self.block_q)
        rows = self.num_blocks + 1 if self.causal else 1
        self.prefix = torch.empty((self.batch, self.heads, rows, self.key_length), device=self.q.device)

    def sizes(self):
        return (self.length, self.key_length, self.head_dim)

    def common(self):
        """The strides of `q`, `k`, `v` and an output like `v`'s rows."""
        out_strides = (self.length * self.heads * self.value_dim, self.heads * self.value_dim,
                       self.value_dim, 1)
        return _strides(self.q) + _strides(self.k) + _strides(self.v) + out_strides + _strides(self.mask)

    def flags(self):
        return dict(NORMALIZE=self.normalize, CAUSAL=self.causal, CAUSAL_MASK=self.causal_mask,
                    HAS_MASK=self.has_mask, BLOCK_Q=self.block_q, BLOCK_K=self.block_k,
                    BLOCK_H=_power_of_two(self.head_dim, 16), BLOCK_HV=_power_of_two(self.value_dim, 16))

    def key_grid(self):
        return (triton.cdiv(self.key_length, self.block_k), self.batch * self.heads)

    def query_grid(self):
        return (self.num_blocks, self.batch * self.heads)


def _forward(call):
    """The output `(B, T, N, HV)` and each row's log-sum-exp `(B, N, T)`."""
    flags = call.flags()
    if call.normalize:
        null = call.null if call.null is not None else call.prefix
        _prefix_kernel[call.key_grid()](
            call.q, call.k, call.mask, null, call.prefix, call.length, call.key_length, call.head_dim,
            call.heads, call.scale, *_strides(call.q), *_strides(call.k), *_strides(call.mask),
            CAUSAL=call.causal, CAUSAL_MASK=call.causal_mask, HAS_MASK=call.has_mask,
            HAS_NULL=call.null is not None, BLOCK_Q=call.block_q, BLOCK_K=call.block_k,
            BLOCK_H=flags["BLOCK_H"],
        )
    out = torch.empty((call.batch, call.length, call.heads, call.value_dim), device=call.q.device)
    lse = torch.empty((call.batch, call.heads, call.length), device=call.q.device)
    _forward_kernel[call.query_grid()](
        call.q, call.k, call.v, call.mask, call.prefix, out, lse, call.length, call.key_length,
        call.head_dim, call.value_dim, call.heads, call.scale, *call.common(), **flags,
    )
    return out, lse


def _backward(call, out, lse, upstream):
    """The gradients in the queries, keys, values and (or `None`) the null logits."""
    upstream = upstream.float().contiguous()
    delta = (upstream * out).sum(-1).permute(0, 2, 1).contiguous()
    dq, dk, dv = (torch.empty_like(x) for x in (call.q, call.k, call.v))
    rows = (call.num_blocks,) if call.causal else ()
    later = torch.zeros((call.batch, call.heads) + rows + (call.key_length,), device=call.q.device)
    start = torch.zeros((call.batch, call.heads, call.key_length), device=call.q.device)
    arguments = (call.length, call.key_length, call.head_dim, call.value_dim, call.heads, call.scale,
                 *call.common())
    _key_gradient_kernel[call.key_grid()](
        call.q, call.k, call.v, call.mask, call.prefix, upstream, lse, delta, dk, dv, later, start,
        *arguments, **call.flags(),
    )
    _query_gradient_kernel[call.query_grid()](
        call.q, call.k, call.v, call.mask, call.prefix, upstream, lse, delta, later, dq,
        *arguments, **call.flags(),
    )
    null_grad = None
    if call.null is not None:
        # `c` takes the null logit as `logaddexp(beta, ...)`; its weights'
        # derivative is `-sum of D exp(beta - c)`, which the key kernel
        # summed per key (causal) or left as column sums of `D` (not).
        if call.causal:
            per_key = start
        else:
            per_key = later * torch.exp(call.null[None, :, None] - call.prefix[:, :, 0])
        null_grad = -per_key.sum(dim=(0, 2))
    return dq, dk, dv, null_grad


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, mask, null_logits, options):
        call = _Call(query, key, value, mask, null_logits, **options)
        out, lse = _forward(call)
        ctx.call, ctx.saved = call, (out, lse)
        # Gradients come back in their inputs' dtypes (bfloat16 included).
        ctx.dtypes = [x.dtype for x in (query, key, value)]
        ctx.null_dtype = None if null_logits is None else null_logits.dtype
        return out

    @staticmethod
    def backward(ctx, upstream):
        dq, dk, dv, null_grad = _backward(ctx.call, *ctx.saved, upstream)
        grads = [g.to(dtype) for g, dtype in zip((dq, dk, dv), ctx.dtypes)]
        if ctx.null_dtype is not None:
            null_grad = null_grad.to(ctx.null_dtype)
        return (*grads, None, null_grad, None)


def kernel_attention(query, key, value, mask=None, null_logits=None, *, normalize, causal, causal_mask,
                     scale, block_q=64, block_k=64):
    """DNA (`normalize=True`) or softmax attention on the Triton kernels.

    `query`: `(B, T, N, H)`; `key`, `value`: `(B, S, N, H or HV)`; `mask`:
    `None` or booleans broadcastable to `(B, N, T, S)`; `null_logits`: `None`
    or one per head (`normalize` only). `causal` normalizes causally,
    `causal_mask` also masks keys after each query (and skips their
    tiles). Returns float32 `(B, T, N, HV)`, differentiable in the query,
    key, value and null logits. Block sizes are powers of two (at least 16,
    as `tl.dot` asks).
    """
    options = dict(normalize=normalize, causal=causal, causal_mask=causal_mask, scale=scale,
                   block_q=block_q, block_k=block_k)
    batch, length, heads = query.shape[:3]
    if length == 0 or key.shape[1] == 0 or batch == 0:
        # No program to launch: no query, or rows without a key (zeros).
        zeros = torch.zeros((batch, length, heads, value.shape[-1]), device=query.device)
        return zeros + 0.0 * (query.sum() + key.sum() + value.sum())
    return _KernelAttention.apply(query, key, value, mask, null_logits, options)
