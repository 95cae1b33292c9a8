"""Which implementation runs an attention call: decided once, here.

`choose_implementation` is a pure function of everything that decides it;
`implementation_for` reads the backend, the platform and Keras's global flash
setting and calls it. The layer calls `implementation_for` once per call and
hands the answer to `keras_dna.ops.doubly_normalized_attention`, which never
decides again. The implementations (the algebra of each is in
`docs/algorithms.md`):

- `"whole"`: the whole `(query_length, key_length)` weight matrix, as
  `MultiHeadAttention` computes it; the only one that can return the weights
  or drop some out, and the one for several attention axes.
- `"blockwise"`: blocks of `chunk_size` queries; memory linear in the
  lengths.
- `"fused"`: the backend's fused softmax kernels
  (`keras.ops.dot_product_attention`) with DNA's per-key bias; non-causal
  only, memory linear in the lengths.
- `"kernel"`: DNA's own kernels (`keras_dna.ops.pallas`, JAX Pallas;
  `keras_dna.ops.triton_kernels`, Triton, for PyTorch), causal and not,
  memory linear in the lengths; compiled for GPUs (Triton) and TPUs
  (Mosaic), interpreted (exact and slow) on CPUs.
- `"reference"`: `docs/math.md`'s formulas as they read
  (`keras_dna.ops.reference`), never chosen; the others are tested
  against it.

The rules, in order (`tests/test_implementation.py` holds the table):

1. Weights returned, dropout or several attention axes: `"whole"`.
2. `flash_attention=False`, or Keras's global setting off: neither
   `"fused"` nor `"kernel"` (rule 5).
3. Below float64, `"kernel"`: JAX on GPUs and TPUs for double and hybrid
   normalization, causal or not, and on TPUs for softmax too, where Keras's
   splash kernel takes no bias and keeps only the first example's mask
   (`keras/src/backend/jax/nn.py`, Keras 3.15); PyTorch on CUDA for causal
   double and hybrid normalization (Triton), which no fused kernel runs.
4. `flash_attention=True` (or `None` while Keras's global setting is on)
   asks for `"fused"`, and raises where it cannot be had: causal double
   normalization (no per-key bias expresses it), TensorFlow (no fused
   kernel), float64 (the kernels compute in float32 outside TensorFlow), JAX
   on CPUs (Keras's JAX flash kernel is cuDNN's, which fails deep in JAX
   there).
   `flash_attention=None`: `"fused"` where a fused kernel takes DNA's bias
   and is faster than writing the scores out: PyTorch (CPU and CUDA) below
   float64, and JAX on GPUs in half precision (cuDNN, softmax there); never
   causal double normalization.
5. Otherwise `chunk_size`: an integer is `"blockwise"`; `"auto"` is
   `"blockwise"` where the scores would be large (`auto_chunk_size`), and
   on PyTorch for causal double and hybrid normalization under the causal
   mask, by blocks of `TORCH_CAUSAL_CHUNK_SIZE` queries where there are
   more; else `"whole"`; `None` is `"whole"`.
"""

import collections
import os

import keras
from keras import ops

from keras_dna.ops.blockwise import auto_chunk_size

IMPLEMENTATIONS = ("whole", "blockwise", "fused", "kernel", "reference")

Implementation = collections.namedtuple("Implementation", ["name", "chunk_size"])
Implementation.__doc__ = """An implementation and its blocks of queries.

`name` is one of `IMPLEMENTATIONS`; `chunk_size` is the number of queries per
block for `"blockwise"` (and for the exact path a `"fused"` call falls back
to, where its read-outs underflow), else `None`."""

_HALF = ("float16", "bfloat16")

# The blocks of queries `chunk_size="auto"` takes for causal DNA under the
# causal mask on PyTorch (rule 5).
TORCH_CAUSAL_CHUNK_SIZE = 64


def choose_implementation(
    *, backend, platform, dtype, normalization, causal, flash_attention, flash_enabled,
    chunk_size, query_shape, key_shape, num_attention_axes=1, dropout=0.0,
    return_weights=False, causal_mask=False,
):
    """The implementation of one attention call.

    Args:
        backend: `"tensorflow"`, `"jax"` or `"torch"`.
        platform: The device the backend runs on: `"cpu"`, `"gpu"` (JAX),
            `"cuda"` (PyTorch) or `"tpu"`.
        dtype: The dtype of the projected queries.
        normalization: `"double"`, `"single"` or `"hybrid"`.
        causal: Whether the call normalizes causally.
        flash_attention: The call's (or layer's) `flash_attention`: `None`,
            `True` or `False`.
        flash_enabled: Keras's global setting,
            `keras.config.is_flash_attention_enabled()` (`None` if never set).
        chunk_size: `None`, `"auto"` or a positive integer.
        query_shape: `(batch, query_length, num_heads, head_dim)`, dims
            possibly `None`.
        key_shape: `(batch, key_length, num_heads, head_dim)`.
        num_attention_axes: How many query (and key) axes attention runs
            over.
        dropout: The dropout rate on the weights.
        return_weights: Whether the call returns the weights.
        causal_mask: Whether the call masks the keys after each query
            (`use_causal_mask`, `is_causal`).

    Returns:
        An `Implementation`.

    Raises:
        ValueError: Where `flash_attention` asks for fused kernels that
            cannot run this call.
    """
    if flash_attention is None:
        flash_attention = flash_enabled
    if return_weights or dropout or num_attention_axes != 1:
        return Implementation("whole", None)
    causal_double = causal and normalization != "single"
    fallback_chunk_size = _exact_chunk_size(
        chunk_size, query_shape, key_shape, backend == "torch" and causal_double and causal_mask
    )
    if flash_attention is not False and _kernel_runs(backend, platform, dtype, normalization, causal):
        return Implementation("kernel", None)
    if flash_attention:
        _check_fused_possible(backend, platform, dtype, causal_double, flash_kernels=True)
        return Implementation("fused", _fallback_chunk_size(query_shape, key_shape))
    if flash_attention is None and _fused_pays(backend, platform, dtype, causal_double):
        return Implementation("fused", _fallback_chunk_size(query_shape, key_shape))
    if fallback_chunk_size is None:
        return Implementation("whole", None)
    return Implementation("blockwise", fallback_chunk_size)


def _exact_chunk_size(chunk_size, query_shape, key_shape, torch_causal):
    """The blocks of queries of a call without fused kernels, or `None`.

    `torch_causal`: causal DNA under the causal mask on PyTorch, whose
    blocks score only the keys up to their last query, and where blocks of
    64 were faster than the whole matrix at every length measured, 512 to
    4096, in a fraction of its memory
    (`benchmarks/results/memory/causal_blocks*.md`).
    """
    if chunk_size != "auto":
        return chunk_size
    length = query_shape[1]
    if torch_causal and length is not None and length > TORCH_CAUSAL_CHUNK_SIZE:
        return TORCH_CAUSAL_CHUNK_SIZE
    return auto_chunk_size(query_shape, key_shape)


def _fallback_chunk_size(query_shape, key_shape):
    """The blocks a fused call's exact fallback takes: the fused path holds
    no score-sized tensor, so neither does its fallback (under XLA, both
    branches of a conditional hold their memory)."""
    return auto_chunk_size(query_shape, key_shape, min_scores=0)


def _kernel_runs(backend, platform, dtype, normalization, causal):
    """Rule 3 of the module docstring."""
    if keras.backend.standardize_dtype(dtype) == "float64":
        return False
    if backend == "torch":
        return platform == "cuda" and causal and normalization != "single"
    if backend != "jax":
        return False
    return platform == "tpu" or (platform == "gpu" and normalization != "single")


def _fused_pays(backend, platform, dtype, causal_double):
    """Rule 4 of the module docstring."""
    if causal_double:
        return False
    dtype = keras.backend.standardize_dtype(dtype)
    if backend == "torch":
        return dtype != "float64"
    return backend == "jax" and platform == "gpu" and dtype in _HALF


def _check_fused_possible(backend, platform, dtype, causal_double, flash_kernels):
    """Raises where fused kernels cannot run DNA; with `flash_kernels`
    (`flash_attention=True`, passed on to the kernels), also where no flash
    kernel can run."""
    if causal_double:
        raise ValueError(
            "Causal normalization has no fused-kernel path: each query's "
            "per-key normalizer sums over a different prefix of the queries, "
            "which is not a per-key bias a fused kernel takes. Pass "
            "flash_attention=None or False for causal calls (use_causal_mask, "
            "causal_normalization, decoders)."
        )
    reason = None
    if backend == "tensorflow":
        reason = "the TensorFlow backend has no fused attention kernel"
    elif flash_kernels and backend == "jax" and platform == "cpu":
        # Keras's JAX flash kernel is cuDNN's; asked for on a CPU, it fails
        # deep in JAX ("cuDNN is not detected"), `MultiHeadAttention` too.
        reason = "Keras's JAX flash kernel is cuDNN's, which needs an NVIDIA GPU"
    elif backend == "jax" and platform == "tpu":
        reason = (
            "Keras's TPU flash kernel (splash attention) takes no bias and "
            "keeps only the first example's mask, so DNA's per-key "
            "normalizer and per-example padding would be dropped silently"
        )
    elif keras.backend.standardize_dtype(dtype) == "float64":
        reason = "fused kernels compute float64 in float32"
    if reason is not None:
        raise ValueError(
            f"`flash_attention=True` cannot run this call: {reason}. Pass "
            f"flash_attention=None or False. Received: backend={backend!r}, "
            f"platform={platform!r}, dtype={keras.backend.standardize_dtype(dtype)!r}"
        )


def check_implementation(implementation, query, *, chunk_size, normalization, causal, flash_attention):
    """Raises unless `implementation` is one of `IMPLEMENTATIONS` and can
    run a call with these arguments and the projected `query`."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            "Argument `implementation` must be None or one of "
            f"{', '.join(repr(name) for name in IMPLEMENTATIONS)}. "
            f"Received: implementation={implementation!r}"
        )
    if implementation == "blockwise" and not isinstance(chunk_size, int):
        raise ValueError(
            "implementation='blockwise' takes its blocks of queries from "
            "`chunk_size`, which must then be a positive integer. "
            f"Received: chunk_size={chunk_size!r}"
        )
    if implementation == "kernel":
        _check_kernel_possible(query.dtype, flash_attention, platform(query))
    if implementation == "fused":
        if flash_attention is False:
            raise ValueError(
                "implementation='fused' runs on fused kernels, which "
                "flash_attention=False rules out. Received: "
                f"implementation={implementation!r}, flash_attention=False"
            )
        if chunk_size == "auto":
            raise ValueError(
                "implementation='fused' takes `chunk_size` as the blocks of "
                "its exact fallback: None or a positive integer. "
                f"Received: chunk_size={chunk_size!r}"
            )
        _check_fused_possible(
            keras.backend.backend(), platform(query), query.dtype,
            causal and normalization != "single", flash_kernels=bool(flash_attention),
        )


def _check_kernel_possible(dtype, flash_attention, target):
    """Raises unless DNA's own kernels can run a call on the `target` platform."""
    reason = None
    backend = keras.backend.backend()
    if backend not in ("jax", "torch"):
        reason = f"they are JAX Pallas and Triton kernels, and the backend is {backend!r}"
    elif backend == "torch" and target != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = (
            "PyTorch runs them with Triton, which compiles for CUDA devices only; on "
            f"{target!r} they run only in Triton's interpreter (TRITON_INTERPRET=1 set "
            "before Triton is imported)"
        )
    elif flash_attention is False:
        reason = "flash_attention=False rules out fused kernels"
    elif keras.backend.standardize_dtype(dtype) == "float64":
        reason = "the kernels compute in float32, and the query is float64"
    if reason is not None:
        raise ValueError(f"implementation='kernel' cannot run this call: {reason}.")


def platform(tensor):
    """The device the backend computes on, as `choose_implementation` takes
    it: JAX's first device's platform (what Keras's `dot_product_attention`
    reads), PyTorch's tensor's device type, `"cpu"` for TensorFlow (whose
    choice the platform does not change)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.devices()[0].platform
    if backend == "torch":
        return ops.convert_to_tensor(tensor).device.type
    return "cpu"


def implementation_for(
    query, key, *, normalization, causal, flash_attention, chunk_size, num_attention_axes=1,
    dropout=0.0, return_weights=False, causal_mask=False,
):
    """`choose_implementation` for projected `query` and `key` tensors
    (`(batch, length, num_heads, head_dim)`), on this backend and platform,
    under Keras's global flash setting."""
    return choose_implementation(
        backend=keras.backend.backend(),
        platform=platform(query),
        dtype=query.dtype,
        normalization=normalization,
        causal=causal,
        flash_attention=flash_attention,
        flash_enabled=keras.config.is_flash_attention_enabled(),
        chunk_size=chunk_size,
        query_shape=tuple(query.shape),
        key_shape=tuple(key.shape),
        num_attention_axes=num_attention_axes,
        dropout=dropout,
        return_weights=return_weights,
        causal_mask=causal_mask,
    )
