"""MultiHeadAttention and DoublyNormalizedAttention on each backend's fused kernels.

For the machine's first accelerator (GPU or TPU; the CPU where there is
none), per backend in its own process, four layers with the same weights:

- `MHA flash`: `flash_attention=True` (flash kernels required);
- `MHA`: `flash_attention=None` (the backend's choice);
- `DNA fused`: non-causal DNA on fused kernels (`flash_attention=True` on an
  accelerator, `None` on a CPU);
- `DNA materialized`: `flash_attention=False`, the scores written out.

Each is timed (forward, forward+backward; medians), `MHA flash` is checked
against `MHA` and `DNA fused` against `DNA materialized`, and every layer
that should run on a fused kernel is checked to do so:

- PyTorch: the fused rows run with `scaled_dot_product_attention` allowed
  its fused kernels only (flash, memory-efficient, cuDNN), so a silent
  fallback to its unfused kernel raises;
- JAX: the fused rows' compiled programs must call a fused kernel (a cuDNN
  or Pallas custom call);
- TensorFlow: Keras has no fused kernel; the fused rows say so.

The table goes to OUTPUT.md and OUTPUT.json; the script exits with status 1
if a fused kernel fell back or two outputs disagree.

    python benchmarks/accelerators.py --backends torch jax tensorflow --output benchmarks/results/accelerators
"""

import argparse
import json
import os
import subprocess
import sys
import time

from _results import markdown_table
from _results import write_results

LAYERS = ("MHA flash", "MHA", "DNA fused", "DNA materialized")
# Half precision against float32 reference paths: a few units of 2^-8.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", choices=["torch", "jax", "tensorflow"],
                   default=["torch", "jax", "tensorflow"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--key-dim", type=int, default=64)
    p.add_argument("--value-dim", type=int, default=None)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on an accelerator, else float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default="benchmarks/results/accelerators")
    p.add_argument("--cell", nargs=1, metavar="LENGTH", help=argparse.SUPPRESS)
    return p.parse_args(argv)


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


def _layers(args, device, dtype):
    import keras

    import keras_dna

    flash = device != "cpu"
    options = dict(num_heads=args.heads, key_dim=args.key_dim, value_dim=args.value_dim,
                   dtype=dtype)
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


def _steps(layer, fused):
    """`forward(x)` and `forward_backward(x)` for the current backend, and
    whether the fused kernel ran (`None`: not checked)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        weights = [v.value for v in layer.trainable_variables]
        others = [v.value for v in layer.non_trainable_variables]

        def forward(weights, x):
            return layer.stateless_call(weights, others, x, x)[0]

        def loss(weights, x):
            return jnp.sum(jnp.square(forward(weights, x).astype("float32")))

        compiled = jax.jit(forward)
        gradient = jax.jit(jax.grad(loss, argnums=(0, 1)))

        def ran_fused(x):
            text = compiled.lower(weights, x).compile().as_text()
            return any(name in text for name in ("cudnn$fmha", "__cudnn", "tpu_custom_call", "mosaic"))

        return (lambda x: jax.block_until_ready(compiled(weights, x)),
                lambda x: jax.block_until_ready(gradient(weights, x)),
                ran_fused if fused else None)
    if backend == "torch":
        import contextlib

        import torch

        context = _fused_only if fused else contextlib.nullcontext

        def forward(x):
            with torch.no_grad(), context():
                return layer(x, x)

        def forward_backward(x):
            x = x.detach().requires_grad_(True)
            with context():
                loss = torch.sum(torch.square(layer(x, x).float()))
                return torch.autograd.grad(loss, [x] + [v.value for v in layer.trainable_variables])

        return forward, forward_backward, None
    import tensorflow as tf

    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(tf.cast(layer(x, x), "float32")))
        return tape.gradient(loss, [x] + layer.trainable_variables)

    return (lambda x: layer(x, x)), forward_backward, None


def time_cell(args, length):
    import keras
    import numpy as np

    device = _device()
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    rng = np.random.default_rng(0)
    width = args.heads * args.key_dim
    x = keras.ops.cast(rng.normal(size=(args.batch, length, width)), dtype)
    layers = _layers(args, device, dtype)
    for layer in layers.values():
        layer.build(x.shape, x.shape)
    layers["MHA flash"].set_weights(layers["MHA"].get_weights())
    layers["DNA materialized"].set_weights(layers["DNA fused"].get_weights())
    backend = keras.backend.backend()
    result = {"device": device, "dtype": dtype, "length": length, "layers": {}}
    outputs = {}
    for name, layer in layers.items():
        fused = name != "DNA materialized" and backend != "tensorflow"
        if backend == "jax" and device == "cpu" and name != "DNA materialized":
            fused = False  # JAX has no fused kernel on a CPU.
        cell = {"fused_expected": fused}
        try:
            forward, forward_backward, ran_fused = _steps(layer, fused)
            outputs[name] = keras.ops.convert_to_numpy(keras.ops.cast(forward(x), "float32"))
            if ran_fused is not None and not ran_fused(x):
                cell["fell_back"] = True
            for step_name, step in (("forward", forward), ("forward_backward", forward_backward)):
                step(x)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    step(x)
                    times.append(time.perf_counter() - start)
                cell[f"{step_name}_ms"] = 1e3 * float(np.median(times))
        except Exception as error:  # noqa: BLE001 - reported per layer
            cell["error"] = _message(error)
            # Under `_fused_only`, PyTorch raises where it would fall back.
            cell["fell_back"] = fused and backend == "torch" and name != "MHA flash"
        result["layers"][name] = cell
    for fast, reference in (("MHA flash", "MHA"), ("DNA fused", "DNA materialized")):
        if fast in outputs and reference in outputs:
            difference = float(np.abs(outputs[fast] - outputs[reference]).max())
            result[f"{fast} vs {reference}"] = difference
    return result


def _message(error):
    """The line that says what went wrong (Keras puts a banner first)."""
    lines = [line.strip("\x1b[0m1 ") for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Exception encountered")]
    return (lines[0] if lines else type(error).__name__)[:160]


def _cell_in_subprocess(args, backend, length):
    command = [sys.executable, __file__, "--cell", str(length), "--batch", str(args.batch),
               "--heads", str(args.heads), "--key-dim", str(args.key_dim),
               "--repeats", str(args.repeats)]
    if args.value_dim:
        command += ["--value-dim", str(args.value_dim)]
    if args.dtype:
        command += ["--dtype", args.dtype]
    result = subprocess.run(command, capture_output=True, text=True,
                            env=dict(os.environ, KERAS_BACKEND=backend))
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["failed"]
        return {"error": lines[-1][:160]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _failures(backend, cell):
    if "error" in cell:
        return [f"{backend}: {cell['error']}"]
    failures = [f"{backend} T={cell['length']} {name}: a fused kernel fell back"
                for name, layer in cell["layers"].items() if layer.get("fell_back")]
    for key, value in cell.items():
        if key.endswith("materialized") or key.endswith("vs MHA"):
            if value > TOLERANCE.get(cell["dtype"], 1e-4):
                failures.append(f"{backend} T={cell['length']} {key}: outputs differ by {value:.2e}")
    return failures


def _rows(backend, cell):
    if "error" in cell:
        return [[backend, "", "", "", cell["error"], "", "", ""]]
    rows = []
    for name, layer in cell["layers"].items():
        timing = [f"{layer[k]:.1f}" if k in layer else "" for k in ("forward_ms", "forward_backward_ms")]
        status = layer.get("error", "fell back" if layer.get("fell_back") else
                           "fused" if layer["fused_expected"] else "unfused")
        rows.append([backend, cell["device"], cell["dtype"], str(cell["length"]), name,
                     *timing, status])
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.cell:
        print(json.dumps(time_cell(args, int(args.cell[0]))))
        return 0
    cells, rows, failures = [], [], []
    for backend in args.backends:
        for length in args.lengths:
            cell = _cell_in_subprocess(args, backend, length)
            cell["backend"] = backend
            cells.append(cell)
            rows += _rows(backend, cell)
            failures += _failures(backend, cell)
    table = markdown_table(
        "Forward and forward+backward, milliseconds (medians):",
        ["backend", "device", "dtype", "T", "layer", "forward ms", "fwd+bwd ms", "kernel"],
        rows,
    )
    if failures:
        table += "\n\nFailures:\n" + "\n".join(f"- {f}" for f in failures)
    settings = {k: v for k, v in vars(args).items() if k not in ("cell", "output")}
    write_results(args.output, "accelerators.py", argv,
                  {"settings": settings, "cells": cells, "failures": failures}, table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
