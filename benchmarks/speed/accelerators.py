"""MultiHeadAttention and DoublyNormalizedAttention on each backend's fused kernels.

For the machine's first accelerator (GPU or TPU; the CPU where there is
none), per backend, length, causal or not, and dtype, in its own process,
four layers with the same weights:

- `MHA flash`: `flash_attention=True` (flash kernels required);
- `MHA`: `flash_attention=None` (the backend's choice);
- `DNA fused`: DNA on fused kernels: on JAX GPUs and TPUs DNA's own Pallas
  kernels (causal too), on PyTorch `scaled_dot_product_attention` (not
  causal) and on CUDA DNA's own Triton kernels (causal; on a CPU causal
  DNA is written out);
- `DNA materialized`: `flash_attention=False`, the scores written out.

Each is timed (forward, forward+backward; interleaved, medians), its
forward+backward step's memory is measured where the backend says it (JAX:
the compiled step's temporary buffers, from XLA's memory analysis; PyTorch
on CUDA: the peak allocation over the step), `MHA flash` is checked against
`MHA` and `DNA fused` against `DNA materialized`, and every layer that
should run on a fused kernel is checked to do so:

- PyTorch: the fused rows run with `scaled_dot_product_attention` allowed
  its fused kernels only (flash, memory-efficient, cuDNN), so a silent
  fallback to its unfused kernel raises;
- JAX: the fused rows' compiled programs must call a fused kernel (a cuDNN,
  Mosaic or Triton custom call); PyTorch's causal DNA must call DNA's Triton
  kernels;
- TensorFlow: Keras has no fused kernel; the fused rows say so.

The table goes to OUTPUT.md and OUTPUT.json; the script exits with status 1
if a fused kernel fell back or two outputs disagree. `--quick` is a run that
fits in about 5 minutes on one GPU (JAX and PyTorch, T=1024 and 4096,
bfloat16, causal and not).

    python -m benchmarks.speed.accelerators --backends torch jax tensorflow
    python -m benchmarks.speed.accelerators --quick
"""

import argparse
import contextlib
import sys

from benchmarks import harness
from benchmarks.speed.layer_step import layer_steps

LAYERS = ("MHA flash", "MHA", "DNA fused", "DNA materialized")
# Half precision against float32 reference paths: a few units of 2^-8.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
# What each backend's step runs as: compiled on JAX, as layers run on the others.
MODES = {"jax": "jit", "torch": "eager", "tensorflow": "graph"}


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "speed/accelerators")
    p.add_argument("--backends", nargs="+", choices=["torch", "jax", "tensorflow"],
                   default=["torch", "jax", "tensorflow"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--key-dim", type=int, default=64)
    p.add_argument("--value-dim", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="default: bfloat16 on an accelerator, float32 on a CPU "
                        "(--dtypes bfloat16 float32 for both)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true",
                   help="JAX and PyTorch, T=1024 and 4096, bfloat16, 3 repeats: about 5 minutes on a GPU")
    args = p.parse_args(argv)
    if args.quick:
        args.backends, args.lengths, args.dtypes, args.repeats = ["jax", "torch"], [1024, 4096], ["bfloat16"], 3
    return args


def _device():
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    if backend == "jax":
        import jax

        return jax.devices()[0].platform
    import tensorflow as tf

    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def _layers(settings, backend, device, dtype, causal):
    """The four layers, MHA's and DNA's each with the same weights."""
    import keras

    import keras_dna

    # Fused kernels required on an accelerator (causal DNA on PyTorch: DNA's
    # Triton kernels).
    flash = device != "cpu"
    options = dict(num_heads=settings.heads, key_dim=settings.key_dim,
                   value_dim=settings.value_dim, dtype=dtype)
    return {
        "MHA flash": keras.layers.MultiHeadAttention(flash_attention=True, **options),
        "MHA": keras.layers.MultiHeadAttention(**options),
        "DNA fused": keras_dna.DoublyNormalizedAttention(
            flash_attention=True if flash else None, chunk_size=None, **options
        ),
        "DNA materialized": keras_dna.DoublyNormalizedAttention(
            flash_attention=False, chunk_size=None, **options
        ),
    }


def _fused_only():
    """A context in which PyTorch's attention may not fall back to its
    unfused kernel."""
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION])


def _jax_ran_fused(layer, x, causal):
    """Whether the layer's compiled forward calls a fused kernel (a cuDNN or
    Pallas custom call)."""
    import jax

    weights = [v.value for v in layer.trainable_variables]
    others = [v.value for v in layer.non_trainable_variables]
    compiled = jax.jit(lambda w, x: layer.stateless_call(w, others, x, x, use_causal_mask=causal)[0])
    text = compiled.lower(weights, x).compile().as_text()
    return any(name in text for name in ("cudnn$fmha", "__cudnn", "tpu_custom_call", "mosaic", "triton"))


def _torch_ran_kernels(forward):
    """Whether `forward()` calls DNA's Triton kernels."""
    from keras_dna.ops import triton_kernels

    calls, original = [], triton_kernels.kernel_attention
    triton_kernels.kernel_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        forward()
    finally:
        triton_kernels.kernel_attention = original
    return bool(calls)


def _timed_steps(layer, backend, fused, x, causal):
    """`{"forward", "forward_backward"}` of `x`, blocking; on PyTorch, with
    `fused`, allowed the fused kernels only."""
    context = _fused_only if fused and backend == "torch" else contextlib.nullcontext

    def under_context(step):
        def call():
            with context():
                return step(x, x)

        return harness.blocking(call)

    steps = layer_steps(layer, MODES[backend], {"use_causal_mask": causal})
    return {name: under_context(step) for name, step in steps.items()}


def _fused_expected(name, backend, device, causal):
    # Keras has no fused kernel on TensorFlow, JAX none on a CPU, and
    # PyTorch none for causal DNA on a CPU.
    if name == "DNA materialized" or backend == "tensorflow":
        return False
    if name == "DNA fused" and causal and backend == "torch" and device == "cpu":
        return False
    return not (backend == "jax" and device == "cpu")


def _step_memory_mib(layer, backend, x, causal, step):
    """The forward+backward step's memory, MiB, where the backend tells it:
    JAX, the compiled step's temporary buffers; PyTorch on CUDA, the peak
    allocated over one step beyond what was allocated before. `None`
    elsewhere."""
    if backend == "jax":
        import jax

        weights = [v.value for v in layer.trainable_variables]
        others = [v.value for v in layer.non_trainable_variables]

        def loss(w, x):
            out = layer.stateless_call(w, others, x, x, use_causal_mask=causal)[0]
            return jax.numpy.sum(jax.numpy.square(out.astype("float32")))

        analysis = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(weights, x).compile().memory_analysis()
        return None if analysis is None else analysis.temp_size_in_bytes / 2**20
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return None


def _check_layer(name, layer, backend, device, x, causal):
    """The layer's status cell, its steps (`None` if it failed) and its
    forward output."""
    import keras

    fused = _fused_expected(name, backend, device, causal)
    cell = {"fused_expected": fused}
    try:
        steps = _timed_steps(layer, backend, fused, x, causal)
        output = keras.ops.convert_to_numpy(keras.ops.cast(steps["forward"](), "float32"))
        if fused and backend == "jax" and not _jax_ran_fused(layer, x, causal):
            cell["fell_back"] = True
        if fused and backend == "torch" and name == "DNA fused" and causal:
            cell["fell_back"] = not _torch_ran_kernels(steps["forward"])
        memory = _step_memory_mib(layer, backend, x, causal, steps["forward_backward"])
        if memory is not None:
            cell["forward_backward_mib"] = memory
        return cell, steps, output
    except Exception as error:  # noqa: BLE001 - reported per layer
        cell["error"] = _message(error)
        # Under `_fused_only`, PyTorch raises where it would fall back.
        cell["fell_back"] = fused and backend == "torch" and name != "MHA flash"
        return cell, None, None


def time_cell(settings, length, causal, dtype):
    """The four layers at this length, causal or not, in `dtype` (`None`:
    the device's default); run in its own process."""
    import keras
    import numpy as np

    settings = argparse.Namespace(**settings)
    backend, device = keras.backend.backend(), _device()
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    x = keras.ops.cast(np.random.default_rng(0).normal(
        size=(settings.batch, length, settings.heads * settings.key_dim)), dtype)
    layers = _layers(settings, backend, device, dtype, causal)
    harness.build_with_same_weights(layers, x.shape)
    result = {"device": device, "dtype": dtype, "length": length, "causal": causal, "layers": {}}
    outputs, steps = {}, {}
    for name, layer in layers.items():
        result["layers"][name], steps_of_layer, output = _check_layer(name, layer, backend, device, x, causal)
        if steps_of_layer is not None:
            outputs[name] = output
            steps.update({(name, step): call for step, call in steps_of_layer.items()})
    timing = harness.time_interleaved(steps, settings.repeats)["steps"]
    for (name, step), summary in timing.items():
        result["layers"][name][f"{step}_ms"] = 1e3 * summary["median_s"]
    for fast, reference in (("MHA flash", "MHA"), ("DNA fused", "DNA materialized")):
        if fast in outputs and reference in outputs:
            difference = float(np.abs(outputs[fast] - outputs[reference]).max())
            result[f"{fast} vs {reference}"] = difference
    return result


def _message(error):
    """The line that says what went wrong (Keras puts a banner first, a
    `tf.function` its traceback)."""
    lines = [line.strip("\x1b[0m1 ") for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines
             if not line.startswith(("Exception encountered", "in user code", "File ", "return "))]
    return (lines[0] if lines else type(error).__name__)[:160]


def _failures(backend, cell):
    if "error" in cell:
        return [f"{backend}: {cell['error']}"]
    where = f"{backend} T={cell['length']}{' causal' if cell['causal'] else ''} {cell['dtype']}"
    failures = [f"{where} {name}: a fused kernel fell back"
                for name, layer in cell["layers"].items() if layer.get("fell_back")]
    for key, value in cell.items():
        if key.endswith("materialized") or key.endswith("vs MHA"):
            if value > TOLERANCE.get(cell["dtype"], 1e-4):
                failures.append(f"{where} {key}: outputs differ by {value:.2e}")
    return failures


def _rows(backend, cell):
    if "error" in cell:
        return [[backend, "", "", "", "", cell["error"], "", "", "", ""]]
    rows = []
    mha = cell["layers"].get("MHA flash", {})
    for name, layer in cell["layers"].items():
        numbers = [f"{layer[k]:.1f}" if k in layer else ""
                   for k in ("forward_ms", "forward_backward_ms", "forward_backward_mib")]
        # DNA against MHA's flash kernel, the targets.
        ratio = ""
        if "forward_backward_ms" in layer and "forward_backward_ms" in mha:
            ratio = f"{layer['forward_backward_ms'] / mha['forward_backward_ms']:.2f}"
        status = layer.get("error", "fell back" if layer.get("fell_back") else
                           "fused" if layer["fused_expected"] else "unfused")
        rows.append([backend, cell["device"], cell["dtype"], str(cell["length"]),
                     "yes" if cell["causal"] else "no", name, *numbers, ratio, status])
    return rows


def main(argv=None):
    args = parse_args(argv)
    cells, rows, failures = [], [], []
    causal_options = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    for backend in args.backends:
        for length in args.lengths:
            for causal in causal_options:
                for dtype in args.dtypes or [None]:
                    cell = harness.in_subprocess(time_cell, vars(args), length, causal, dtype, backend=backend)
                    cell["backend"] = backend
                    cells.append(cell)
                    rows += _rows(backend, cell)
                    failures += _failures(backend, cell)
    table = harness.markdown_table(
        "Forward and forward+backward, milliseconds (medians); the step's memory, MiB "
        "(JAX: XLA's temporary buffers; PyTorch on CUDA: peak allocation); fwd+bwd against "
        "`MHA flash`:",
        ["backend", "device", "dtype", "T", "causal", "layer", "forward ms", "fwd+bwd ms",
         "fwd+bwd MiB", "/ MHA flash", "kernel"],
        rows,
    )
    if failures:
        table += "\n\nFailures:\n" + "\n".join(f"- {f}" for f in failures)
    harness.write_results(args, {"cells": cells, "failures": failures}, table, argv)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
