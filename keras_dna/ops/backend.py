"""The places where a Keras backend needs something of its own.

Everything else in `keras_dna.ops` is written in `keras.ops` and runs on any
backend; what differs lives here, so that a backend has one place to go:

- `einsum`: `tf.einsum` on TensorFlow, where Keras' own einsum is slower for
  attention-shaped equations;
- `compiled`: an XLA-compiled version of a function, shared by every layer
  that calls it (TensorFlow and JAX), so that uncompiled models still run
  the normalization compiled;
- `cumulative_logsumexp`: each backend's own prefix log-sum-exp, for axes
  whose length is only known when the function runs;
- `result_dtype`, `maximum` and `cumsum`: dtype promotion, an elementwise
  maximum and a cumulative sum that keep float64 (Keras turns float64 into
  float32 outside TensorFlow);
- `known_int`: the value of an integer scalar where it is known before the
  computation runs (Python numbers, eager tensors), for argument checks;
- `pad_last_axis`, `kernel_flash_attention` and `unless_trusted`: a zero
  padding, the fused kernels' flash setting and the fused path's fallback,
  written so that `torch.compile` traces them once (see each).
"""

import functools

import keras
import numpy as np
from keras import ops


def result_dtype(*dtypes):
    """`keras.backend.result_type`, but float64 stays float64 on every backend.

    (Keras maps float64 to float32 outside TensorFlow, even with JAX's x64
    mode on, which would silently round float64 work.)
    """
    names = [keras.backend.standardize_dtype(d) for d in dtypes]
    if "float64" in names:
        return "float64"
    return keras.backend.result_type(*names)


def known_int(x):
    """`x` as a Python int where its value is known now: a Python or NumPy
    integer, or an eager tensor; `None` inside a trace (a graph, `jax.jit`,
    `torch.compile`), where reading it would fail or split the graph."""
    if isinstance(x, (int, np.integer)):
        return int(x)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return None if tf.is_symbolic_tensor(x) else int(x)
    if backend == "jax":
        import jax

        return None if isinstance(x, jax.core.Tracer) else int(x)
    if backend == "torch":
        import torch

        return None if torch.compiler.is_compiling() else int(x)
    return None


def maximum(a, b):
    """`ops.maximum`, keeping float64 on every backend (`ops.where` does)."""
    if keras.backend.backend() == "tensorflow":
        return ops.maximum(a, b)
    return ops.where(a >= b, a, b)


def cumsum(x, axis):
    """`ops.cumsum`, keeping float64 on PyTorch too."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.cumsum(x, dim=axis)
    return ops.cumsum(x, axis=axis)


def scaled(x, scale):
    """`x * scale` in the dtype of `x`, for a Python or tensor `scale`.

    `ops.multiply(x, 0.125)` rounds the Python float through float32 on
    PyTorch (float64 attention was 1e-8 off the oracle), and `ops.cast` of
    a Python float does on every backend; converting it straight to the
    dtype of `x` rounds it once, as a weakly typed scalar would.
    """
    if isinstance(scale, (int, float)):
        return ops.multiply(x, ops.convert_to_tensor(scale, dtype=x.dtype))
    return ops.multiply(x, ops.cast(scale, x.dtype))


def einsum(equation, *operands):
    """`keras.ops.einsum`, but `tf.einsum` on the TensorFlow backend.

    Keras' TensorFlow einsum rewrites attention-shaped equations into
    transposes and batched matmuls (for its quantized kernels); under XLA
    on a CPU that made a layer's forward+backward step slower than
    `tf.einsum` (`benchmarks/results/speed/layer_step_query_first.md`), which `keras.ops.dot_product_attention` (and so
    `MultiHeadAttention`) uses.
    """
    operands = [ops.convert_to_tensor(x) for x in operands]
    dtype = result_dtype(*(x.dtype for x in operands))
    operands = [ops.cast(x, dtype) for x in operands]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.einsum(equation, *operands)
    return ops.einsum(equation, *operands)


# One XLA-compiled function per function, shared by all layers: each
# combination of static arguments and shapes is traced and compiled once.
_compiled_functions = {}


def _static_shapes(arguments):
    """Whether every tensor in `arguments` has a fully known shape."""
    return all(
        None not in tuple(x.shape)
        for x in keras.tree.flatten(arguments)
        if hasattr(x, "shape") and x.shape is not None
    )


def compiled(function, jit_compile):
    """`function`, XLA-compiled where `jit_compile` asks and the backend can.

    `jit_compile` is `True`, `False` or `"auto"`; both `True` and `"auto"`
    compile on TensorFlow and JAX. PyTorch runs `function` as it is.
    """
    backend = keras.backend.backend()
    if jit_compile is False or backend not in ("tensorflow", "jax"):
        return function
    return _jax_compiled(function) if backend == "jax" else _tensorflow_compiled(function)


def _tensorflow_compiled(function):
    def call(*args, **kwargs):
        if _in_xla_trace():
            return function(*args, **kwargs)
        # Traced once per shape (XLA compiles once per shape anyway). With
        # relaxed shapes (`reduce_retracing`), a trace shared by hybrid layers
        # with different numbers of heads computed one layer's gradient with
        # another layer's mixing logits. Calls with unknown dimensions (a
        # SavedModel's signature) get a function of their own: TensorFlow
        # would reuse their general trace for later static calls, which then
        # lose the code paths that need static lengths (LiteRT conversion).
        # No AutoGraph: the code branches with `keras.ops`, and converting
        # it took most of a causal layer's trace
        # (`benchmarks/results/compile/compile_time.md`).
        key = (function, _static_shapes((args, kwargs)))
        if key not in _compiled_functions:
            import tensorflow as tf

            _compiled_functions[key] = tf.function(function, jit_compile=True, autograph=False)
        return _compiled_functions[key](*args, **kwargs)

    return call


def _in_xla_trace():
    """Whether TensorFlow is tracing a function it compiles with XLA.

    There the outer compilation covers the normalization; a compiled
    function nested in it made XLA take the gradient step's inputs and
    weights as compile-time constants, recompiling every step of a chunked
    layer's `fit(jit_compile=True)`, even for a 6-token model.
    `tf.function` itself asks this way whether to compile a nested call.
    """
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _jax_compiled(function):
    import jax

    def call(*args, **kwargs):
        # Eager calls on arrays are compiled: op by op, each call would trace
        # the conditionals anew (an eager causal layer was many times slower
        # than softmax). Inside `jax.jit` (or `vmap`) it would make no
        # difference: traced calls run as they are. Options that are not
        # arrays are static.
        static = {k: v for k, v in kwargs.items() if not hasattr(v, "shape")}
        arrays = (args, {k: v for k, v in kwargs.items() if k not in static})
        eager = _eager_arrays(keras.tree.flatten(arrays))
        if eager is None:
            return function(*args, **kwargs)
        key = (function, tuple(sorted(static.items())), eager == "differentiated")
        if key not in _compiled_functions:
            bound = functools.partial(_call_with, functools.partial(function, **static))
            if eager == "differentiated":
                _compiled_functions[key] = _jax_differentiable_jit(bound)
            else:
                _compiled_functions[key] = jax.jit(bound)
        return _compiled_functions[key](arrays)

    return call


def _call_with(function, arrays):
    args, kwargs = arrays
    return function(*args, **kwargs)


def _eager_arrays(values):
    """`"plain"` for concrete arrays, `"differentiated"` when some are
    traced by eager differentiation (`jax.grad` outside `jax.jit`) and
    nothing else, `None` for any other trace."""
    import jax

    differentiated = False
    for x in values:
        # Differentiation's tracers (JVP, linearize) carry the value they
        # differentiate at as `primal`; `jit`'s and `vmap`'s do not.
        while isinstance(x, jax.core.Tracer) and hasattr(x, "primal"):
            differentiated, x = True, x.primal
        if isinstance(x, jax.core.Tracer):
            return None
    return "differentiated" if differentiated else "plain"


def _jax_differentiable_jit(function):
    """`jax.jit(function)` for eager differentiation, its gradient compiled
    too: the backward pass differentiates `function` again inside
    `jax.jit` (the forward runs twice). Compiling `function` as it is
    would not do: `jax.custom_gradient` inside `jax.jit` under an outer
    `jax.grad` fails when the gradient closes over a traced mask."""
    import jax

    forward = jax.jit(function)

    @jax.jit
    def backward(arrays, upstream):
        return jax.vjp(function, arrays)[1](upstream)

    @jax.custom_vjp
    def differentiable(arrays):
        return forward(arrays)

    differentiable.defvjp(lambda arrays: (forward(arrays), arrays), backward)
    return differentiable


def differentiable_in_branch(function, **static):
    """`function(*arrays, **static)` as a function of the arrays that JAX can
    differentiate inside a branch of `ops.cond`.

    There the custom gradients of `keras_dna.ops` close over values the
    branch's trace made (a mask's per-row reductions), which
    `jax.custom_gradient` cannot take ("No constant handler"). Wrapped, the
    function runs as it is forward, and its gradient differentiates it
    again in a trace of its own (`_jax_differentiable_jit`). Other
    backends run `function` as it is. One wrapper per function and static
    arguments, shared by all calls.
    """
    if keras.backend.backend() != "jax":
        return functools.partial(function, **static)
    key = ("in_branch", function, tuple(sorted(static.items())))
    if key not in _compiled_functions:
        bound = functools.partial(_call_with, functools.partial(function, **static))
        _compiled_functions[key] = _jax_differentiable_jit(bound)
    differentiable = _compiled_functions[key]
    return lambda *arrays: differentiable((arrays, {}))


def cumulative_logsumexp(x, axis, reverse=False):
    """Inclusive prefix (with `reverse`, suffix) log-sum-exp along `axis`.

    Keras has no such op; each backend has one, exact for any spread, that
    takes lengths unknown when traced (and empty axes), which unrolled code
    cannot. Not for differentiation (callers write the gradient out).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.math.cumulative_logsumexp(x, axis=axis, reverse=reverse)
    if backend == "jax":
        import jax

        return jax.lax.cumlogsumexp(x, axis=axis % len(x.shape), reverse=reverse)
    if backend == "torch":
        import torch

        if reverse:
            return torch.flip(torch.logcumsumexp(torch.flip(x, (axis,)), axis), (axis,))
        return torch.logcumsumexp(x, axis)
    import numpy as np

    x = np.asarray(x)
    if reverse:
        return np.flip(np.logaddexp.accumulate(np.flip(x, axis), axis=axis), axis)
    return np.logaddexp.accumulate(x, axis=axis)


def half_precision_kernels_only():
    """Whether the backend's fused attention kernels take half precision
    only: JAX on GPUs and TPUs (cuDNN, Pallas), where Keras computes a
    float32 call through the whole score matrix. PyTorch has fused float32
    kernels on CPUs and GPUs."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.devices()[0].platform in ("gpu", "tpu")


def records_gradients(*tensors):
    """Whether a gradient may be taken through `tensors`: `False` only
    where the backend says none will (PyTorch outside autograd); `True`
    wherever it cannot tell (TensorFlow tapes, JAX transformations)."""
    if keras.backend.backend() != "torch":
        return True
    import torch

    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )


def torch_compiling():
    """Whether `torch.compile` is tracing the current call."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    return torch.compiler.is_compiling()


def cond(pred, true_fn, false_fn):
    """`ops.cond(pred, true_fn, false_fn)`, but a plain Python `if` on
    PyTorch, which is what Keras's PyTorch `cond` runs: Keras also builds a
    `keras.Operation` there, whose global name counter `torch.compile`
    guards on, so every compiled call recompiled the function around it.
    A predicate on the meta device (Keras's shape inference) takes
    `true_fn`, as Keras's `cond` does."""
    if keras.backend.backend() == "torch":
        if pred.is_meta:
            return true_fn()
        return true_fn() if bool(pred) else false_fn()
    return ops.cond(pred, true_fn, false_fn)


def pad_last_axis(x, extra):
    """`x` with `extra` zeros appended along its last axis.

    Not `ops.pad` on PyTorch: it builds a `keras.Operation` at every call,
    whose name counter (`pad_1`, `pad_2`, ...) `torch.compile` guards on,
    so that every call of a compiled fused layer recompiled.
    """
    if keras.backend.backend() == "torch":
        import torch

        return torch.nn.functional.pad(x, (0, extra))
    return ops.pad(x, [(0, 0)] * (len(x.shape) - 1) + [(0, extra)])


def kernel_flash_attention(flash_attention):
    """The `flash_attention` to pass to `keras.ops.dot_product_attention`.

    Under `torch.compile`, `None` becomes `False`: with `None`, Keras asks
    PyTorch whether a flash kernel can run (`SDPAParams`, which Dynamo
    cannot trace), splitting the graph at every fused call; with `False`
    it calls `scaled_dot_product_attention` as it is, and PyTorch's own
    dispatcher takes a flash kernel wherever one can run.
    """
    if flash_attention is None and torch_compiling():
        return False
    return flash_attention


def unless_trusted(trusted, output, fallback, *arrays):
    """`output` where the boolean scalar `trusted` holds, else
    `fallback(*arrays)` in the dtype of `output`; only the branch taken
    runs (where the backend can tell).

    `ops.cond` everywhere but under `torch.compile`, where Keras's `cond`
    (a Python `if` on a tensor, and a `keras.Operation` whose name counter
    Dynamo guards on) split the graph and recompiled at every call. There
    the choice runs outside the graph, in one function Dynamo leaves alone:
    the graph splits once, there, and the fallback runs eagerly only when
    it is taken. (The fused path's own choice is a custom operation that
    splits nothing, `keras_dna.ops.dispatch`; this is its general
    fallback, for a tensor `scale`.)
    """
    if torch_compiling():
        return _torch_unless_trusted(trusted, output, fallback, *arrays)
    return _unless_trusted(trusted, output, fallback, *arrays)


def _unless_trusted(trusted, output, fallback, *arrays):
    return cond(trusted, lambda: output, lambda: ops.cast(fallback(*arrays), output.dtype))


# Made once, here: decorating it while Dynamo traces would make a new
# function at every trace.
_torch_unless_trusted = _unless_trusted
if keras.backend.backend() == "torch":
    import torch

    _torch_unless_trusted = torch.compiler.disable(_unless_trusted)
