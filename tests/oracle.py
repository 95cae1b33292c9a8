"""Float64 NumPy transcription of docs/math.md, the numeric oracle (property 7).

Written from the formulas of docs/math.md, loop by loop, sharing no code with
keras_dna: `validity` is m[i, j] ("Notation"); `attention_weights` holds single
normalization, double normalization in its log-space form, causal
normalization, the null query and hybrid mixing; `layer_forward` adds a
layer's projections. Properties 1-5, 8 and 9 of docs/math.md are theorems of
these formulas, so the oracle's weights satisfy them too; the tests check them
on the package and compare the package's numbers with the oracle's. Property
6 is `normalization="single"` here: a plain row softmax.
"""

import numpy as np


def _logsumexp(values):
    top = np.max(values)
    return top + np.log(np.sum(np.exp(values - top)))


def _row_softmax(logits, valid):
    out = np.zeros_like(logits)
    if valid.any():
        chosen = logits[valid]
        out[valid] = np.exp(chosen - _logsumexp(chosen))
    return out


def _one_head(s, m, normalization, causal, softmax_share, beta=None):
    T, S = s.shape
    single = np.zeros_like(s)
    for i in range(T):
        single[i] = _row_softmax(s[i], m[i])
    if normalization == "single":
        return single
    log_b = np.zeros_like(s)
    for i in range(T):
        queries = range(i + 1) if causal else range(T)
        for j in range(S):
            if not m[i, j]:
                continue
            column = [s[k, j] for k in queries if m[k, j]]
            if beta is not None:
                # The null query: one more term, of log-mass beta, per key.
                column.append(beta)
            log_b[i, j] = s[i, j] - _logsumexp(np.array(column))
    double = np.zeros_like(s)
    for i in range(T):
        double[i] = _row_softmax(log_b[i], m[i])
    if normalization == "double":
        return double
    return softmax_share * single + (1.0 - softmax_share) * double


def attention_weights(
    scores, valid=None, normalization="double", causal=False, mixing_logits=None,
    null_query_logits=None,
):
    """Weights for scores shaped (..., heads, T, S); `valid` broadcasts to it.

    `null_query_logits`: None, or one beta per head (docs/math.md, "The null query").
    """
    s = np.asarray(scores, dtype=np.float64)
    m = np.ones(s.shape, bool) if valid is None else np.broadcast_to(valid, s.shape)
    heads = s.shape[-3]
    if mixing_logits is None:
        mixing_logits = np.zeros(heads)
    share = 1.0 / (1.0 + np.exp(-np.asarray(mixing_logits, np.float64)))
    out = np.zeros_like(s)
    for index in np.ndindex(*s.shape[:-2]):
        beta = None if null_query_logits is None else float(null_query_logits[index[-1]])
        out[index] = _one_head(
            s[index], m[index], normalization, causal, share[index[-1]], beta
        )
    return out


def validity(batch, q_len, k_len, query_mask=None, key_mask=None,
             attention_mask=None, causal=False, sliding_window=None):
    """The (B, T, S) AND of every mask: m[i, j] of docs/math.md, "Notation"."""
    m = np.ones((batch, q_len, k_len), bool)
    if query_mask is not None:
        m &= np.asarray(query_mask, bool)[:, :, None]
    if key_mask is not None:
        m &= np.asarray(key_mask, bool)[:, None, :]
    if attention_mask is not None:
        m &= np.broadcast_to(np.asarray(attention_mask, bool), m.shape)
    i = np.arange(q_len)[:, None]
    j = np.arange(k_len)[None, :]
    if causal:
        m &= j <= i
    if sliding_window is not None:
        m &= np.abs(i - j) < sliding_window
    return m


def layer_forward(layer, query, value, key=None, valid=None, causal=False):
    """Forward pass of a built (B, T, dim) attention layer in float64.

    Returns (output (B, T, E), weights (B, N, T, S)).
    """
    key = value if key is None else key
    q = np.tensordot(np.asarray(query, np.float64),
                     np.asarray(layer.query_dense.kernel, np.float64), axes=1)
    k = np.tensordot(np.asarray(key, np.float64),
                     np.asarray(layer.key_dense.kernel, np.float64), axes=1)
    v = np.tensordot(np.asarray(value, np.float64),
                     np.asarray(layer.value_dense.kernel, np.float64), axes=1)
    if layer.use_bias:
        q = q + np.asarray(layer.query_dense.bias, np.float64)
        k = k + np.asarray(layer.key_dense.bias, np.float64)
        v = v + np.asarray(layer.value_dense.bias, np.float64)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    mixing = getattr(layer, "mixing_logits", None)
    null = getattr(layer, "null_query_logits", None)
    weights = attention_weights(
        scores,
        # (B, T, S) for every head, or per head (B, N, T, S).
        None if valid is None else valid if valid.ndim == 4 else valid[:, None],
        normalization=getattr(layer, "normalization", "single"),
        causal=causal,
        mixing_logits=None if mixing is None else np.asarray(mixing),
        null_query_logits=None if null is None else np.asarray(null),
    )
    context = np.einsum("bnts,bsnh->btnh", weights, v)
    out = np.tensordot(context, np.asarray(layer.output_dense.kernel, np.float64), axes=2)
    if layer.use_bias:
        out = out + np.asarray(layer.output_dense.bias, np.float64)
    return out, weights


def group_query_forward(
    weights, query, value, key=None, *, num_key_value_heads, valid=None, causal=False,
    normalization="double", mixing_logits=None, null_query_logits=None,
):
    """Forward pass of grouped-query attention in float64.

    `weights` maps "query", "key", "value", "attention_output" to
    `(kernel, bias or None)`: kernels `(dim, heads, head_dim)` for the
    projections and `(query_heads, head_dim, dim)` for the output. Query
    head `u` reads key and value head `u // (query_heads / kv_heads)`;
    the weights are `attention_weights` of each query head's own scores.
    Returns (output (B, T, dim), weights (B, query_heads, T, S)).
    """
    key = value if key is None else key

    def project(x, name):
        kernel, bias = weights[name]
        out = np.einsum("btm,mnh->btnh", np.asarray(x, np.float64), np.asarray(kernel, np.float64))
        return out if bias is None else out + np.asarray(bias, np.float64)

    q, k, v = project(query, "query"), project(key, "key"), project(value, "value")
    group = q.shape[2] // num_key_value_heads
    kv_head = np.arange(q.shape[2]) // group
    k, v = k[:, :, kv_head], v[:, :, kv_head]
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    attention = attention_weights(
        scores, None if valid is None else valid if valid.ndim == 4 else valid[:, None],
        normalization=normalization, causal=causal, mixing_logits=mixing_logits,
        null_query_logits=null_query_logits,
    )
    context = np.einsum("bnts,bsnh->btnh", attention, v)
    kernel, bias = weights["attention_output"]
    out = np.einsum("btnh,nhm->btm", context, np.asarray(kernel, np.float64))
    return (out if bias is None else out + np.asarray(bias, np.float64)), attention


def group_query_layer_forward(layer, query, value, key=None, valid=None, causal=False):
    """`group_query_forward` with the weights of a built
    `DoublyNormalizedGroupQueryAttention` (or Keras's `GroupQueryAttention`,
    as softmax), read by their paths."""
    arrays = {w.path.split("/", 1)[1]: np.asarray(w.numpy()) for w in layer.weights}
    weights = {
        name: (arrays[f"{name}/kernel"], arrays.get(f"{name}/bias"))
        for name in ("query", "key", "value", "attention_output")
    }
    return group_query_forward(
        weights, query, value, key, num_key_value_heads=layer.num_key_value_heads, valid=valid,
        causal=causal, normalization=getattr(layer, "normalization", "single"),
        mixing_logits=arrays.get("mixing_logits"), null_query_logits=arrays.get("null_query_logits"),
    )
