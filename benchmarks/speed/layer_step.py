"""Times DoublyNormalizedAttention against keras.layers.MultiHeadAttention, per backend.

Whole layers with the same weights, shapes and dtype; forward and
forward+backward (gradients of the summed squared output in the inputs and
the weights), self- and cross-attention, causal and not, over a grid of
sequence lengths. Batches hold a fixed number of tokens (--tokens), so long
sequences fit in memory. Each backend runs its steps as its users do
(--modes):

- TensorFlow `xla`: each step in `tf.function(jit_compile=True)`; `graph`:
  a plain graph, as Keras' `fit` runs on CPUs, with DNA also timed with its
  normalization not compiled (`jit_compile=False`);
- JAX `jit`: `jax.jit` of `layer.stateless_call`, as Keras' JAX trainer
  compiles a step; `eager`: the same functions op by op;
- PyTorch `eager`: `torch.no_grad` forward, `torch.autograd.grad` backward.

On JAX and PyTorch `MHA with scores` (`return_attention_scores=True`) also
runs: Keras hands MHA's attention to a fused kernel there, which never
writes the score matrix that DNA must write. --chunk-size adds DNA by blocks
of queries. Each cell is timed in its own process (both layers
interleaved, ratios per repeat); peak resident memory of one
forward+backward is measured per layer in a process of its own.

    python -m benchmarks.speed.layer_step --lengths 128 512 2048
    python -m benchmarks.speed.layer_step --backends jax torch --output benchmarks/results/speed/layer_step_backends
"""

import argparse
import itertools
import os

from benchmarks import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
MODES = {"tensorflow": ("xla", "graph"), "jax": ("jit", "eager"), "torch": ("eager",)}
STEPS = ("forward", "forward_backward")
# Each ratio's label, and the steps it divides; present where both ran.
RATIOS = {
    "DNA/MHA": ("dna", "mha"),
    "DNA/MHA, normalization not compiled": ("dna_uncompiled", "mha"),
    "DNA/MHA with scores": ("dna", "mha_with_scores"),
    "chunked/MHA": ("dna_chunked", "mha"),
}


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "speed/layer_step")
    p.add_argument("--backends", nargs="+", choices=sorted(MODES), default=["tensorflow"])
    p.add_argument("--modes", nargs="+", choices=["xla", "graph", "jit", "eager"],
                   default=["xla", "jit", "eager"], help="those of each backend's modes to run")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (batch = tokens / length)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention", nargs="+", choices=["self", "cross"], default=["self", "cross"])
    p.add_argument("--causal", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-size", default=None,
                   help="also time DNA with this chunk_size (an integer or 'auto')")
    p.add_argument("--skip-memory", action="store_true")
    return p.parse_args(argv)


def variants(settings, backend, mode, causal_cross):
    """`{name: (layer, return_attention_scores)}`, MHA first."""
    import keras

    import keras_dna

    options = dict(num_heads=settings.heads, key_dim=settings.width // settings.heads,
                   dtype=settings.dtype)
    # Cross-attention in a decoder is not causally masked, only normalized.
    dna_options = dict(options, chunk_size=None, causal_normalization=causal_cross)
    mha = keras.layers.MultiHeadAttention(**options)
    layers = {"mha": (mha, False), "dna": (keras_dna.DoublyNormalizedAttention(**dna_options), False)}
    if mode == "graph":
        layers["dna_uncompiled"] = (
            keras_dna.DoublyNormalizedAttention(jit_compile=False, **dna_options), False)
    if backend != "tensorflow":
        layers["mha_with_scores"] = (mha, True)
    if settings.chunk_size is not None:
        chunk_size = settings.chunk_size if settings.chunk_size == "auto" else int(settings.chunk_size)
        layers["dna_chunked"] = (
            keras_dna.DoublyNormalizedAttention(**dict(dna_options, chunk_size=chunk_size)), False)
    return layers


def inputs(settings, length, attention):
    """`(query, value, batch)`: random tensors of --tokens tokens."""
    import keras
    import numpy as np

    batch = max(1, settings.tokens // length)
    rng = np.random.default_rng(0)
    query = rng.normal(size=(batch, length, settings.width))
    # Cross-attention reads a source of the same length, as in translation.
    value = query if attention == "self" else rng.normal(size=query.shape)
    return (keras.ops.convert_to_tensor(query, settings.dtype),
            keras.ops.convert_to_tensor(value, settings.dtype), batch)


def layer_steps(layer, mode, call_options):
    """`{"forward", "forward_backward"}`: functions of `(query, value)` on
    the current backend, as `mode` runs them, not blocking."""
    import keras

    def output(query, value):
        result = layer(query, value, **call_options)
        return result[0] if call_options.get("return_attention_scores") else result

    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_steps(layer, mode, call_options)
    if backend == "torch":
        return _torch_steps(layer, output)
    return _tensorflow_steps(layer, output, mode == "xla")


def _loss(output):
    import keras

    return keras.ops.sum(keras.ops.square(keras.ops.cast(output, "float32")))


def _tensorflow_steps(layer, output, jit_compile):
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile)
    def forward(query, value):
        return output(query, value)

    @tf.function(jit_compile=jit_compile)
    def forward_backward(query, value):
        with tf.GradientTape() as tape:
            tape.watch([query, value])
            loss = _loss(output(query, value))
        return tape.gradient(loss, [query, value] + layer.trainable_weights)

    return {"forward": forward, "forward_backward": forward_backward}


def _jax_steps(layer, mode, call_options):
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(weights, query, value):
        result, _ = layer.stateless_call(weights, non_trainable, query, value, **call_options)
        return result[0] if call_options.get("return_attention_scores") else result

    steps = {"forward": forward,
             "forward_backward": jax.grad(lambda *a: _loss(forward(*a)), argnums=(0, 1, 2))}
    if mode == "jit":
        steps = {name: jax.jit(step) for name, step in steps.items()}
    return {name: lambda q, v, step=step: step(trainable, q, v) for name, step in steps.items()}


def _torch_steps(layer, output):
    import torch

    weights = [v.value for v in layer.trainable_variables]

    def forward(query, value):
        with torch.no_grad():
            return output(query, value)

    def forward_backward(query, value):
        query, value = (x.detach().requires_grad_(True) for x in (query, value))
        return torch.autograd.grad(_loss(output(query, value)), [query, value] + weights)

    return {"forward": forward, "forward_backward": forward_backward}


def _cell_layers(settings, mode, length, attention, causal):
    settings = argparse.Namespace(**settings)
    query, value, batch = inputs(settings, length, attention)
    layers = variants(settings, _backend(), mode, causal and attention == "cross")
    harness.build_with_same_weights(
        {name: layer for name, (layer, _) in layers.items()}, query.shape, value.shape)
    call_options = {"use_causal_mask": causal and attention == "self"}
    steps = {name: layer_steps(layer, mode, dict(call_options, return_attention_scores=scores))
             for name, (layer, scores) in layers.items()}
    return steps, query, value, batch


def self_attention_step(settings, name, length, causal, step="forward_backward", mode="xla"):
    """`(function of (query, value), query, batch)`: one variant's step,
    self-attention, not yet traced; `settings` as this script's options
    (--width, --heads, --tokens)."""
    settings = argparse.Namespace(**dict(vars(settings), dtype="float32", chunk_size=None))
    query, _, batch = inputs(settings, length, "self")
    layer, _ = variants(settings, _backend(), mode, False)[name]
    harness.build_with_same_weights({name: layer}, query.shape)
    return layer_steps(layer, mode, {"use_causal_mask": causal})[step], query, batch


def _backend():
    import keras

    return keras.backend.backend()


def time_cell(settings, mode, length, attention, causal):
    """Both steps of every variant, interleaved; run in its own process."""
    steps, query, value, batch = _cell_layers(settings, mode, length, attention, causal)
    result = {"batch": batch}
    for step in STEPS:
        calls = {name: harness.blocking(lambda s=s[step]: s(query, value)) for name, s in steps.items()}
        ratios = {label: pair for label, pair in RATIOS.items() if set(pair) <= set(calls)}
        result[step] = harness.time_interleaved(calls, settings["repeats"], ratios)
    return result


def memory_cell(settings, mode, length, attention, causal, variant):
    """Peak resident GiB of a process that ran one forward+backward of
    `variant` alone; run in its own process."""
    steps, query, value, _ = _cell_layers(settings, mode, length, attention, causal)
    harness.blocking(steps[variant]["forward_backward"])(query, value)
    return harness.peak_memory_gib()


def measure(args, backend, mode, length, attention, causal):
    settings = vars(args)
    row = {"backend": backend, "mode": mode, "length": length, "attention": attention,
           "causal": causal == "yes"}
    cell = (mode, length, attention, causal == "yes")
    row.update(harness.in_subprocess(time_cell, settings, *cell, backend=backend))
    # Each layer alone: it may fit where the timing process, holding every
    # variant's compiled steps, ran out of memory.
    if not args.skip_memory:
        measured = ["mha", "dna"] + (["dna_chunked"] if args.chunk_size else [])
        row["peak_gib"] = {name: harness.in_subprocess(memory_cell, settings, *cell, name,
                                                       backend=backend) for name in measured}
    return row


def cells(args):
    for backend in args.backends:
        modes = [m for m in MODES[backend] if m in args.modes]
        yield from itertools.product([backend], modes, args.lengths, args.attention, args.causal)


def _columns(rows):
    """(heading, value of a row) for the columns these rows have."""
    timed = [r for r in rows if "error" not in r]
    labels = [label for label in RATIOS if any(label in r["forward"]["ratios"] for r in timed)]
    columns = [(f"{'forward' if step == 'forward' else 'fwd+bwd'} {label}",
                lambda r, s=step, label=label: _number(r[s]["ratios"].get(label, {}).get("median")))
               for label in labels for step in STEPS]
    columns += [(f"{'forward' if step == 'forward' else 'fwd+bwd'} MHA ms",
                 lambda r, s=step: f"{r[s]['steps']['mha']['median_s'] * 1e3:.0f}") for step in STEPS]
    measured = [name for name in ("mha", "dna", "dna_chunked")
                if any(name in r.get("peak_gib", {}) for r in rows)]
    columns += [(f"peak GiB {name.upper().replace('_CHUNKED', ' chunked')}",
                 lambda r, name=name: _gib(r["peak_gib"].get(name))) for name in measured]
    return columns


def _number(value):
    return "-" if value is None else f"{value:.2f}"


def _gib(value):
    return f"{value:.2f}" if isinstance(value, float) else "failed"


def markdown(rows):
    columns = _columns(rows)
    header = ["backend", "mode", "T", "batch", "attention", "causal"] + [h for h, _ in columns]
    table = []
    for r in rows:
        cells = [r["backend"], r["mode"], str(r["length"]), str(r.get("batch", "")),
                 r["attention"], str(r["causal"])]
        if "error" in r:
            # The timing failed; memory, measured apart, may not have.
            values = [value(r) if heading.startswith("peak") else "" for heading, value in columns]
            values[0] = r["error"]
        else:
            values = [value(r) for _, value in columns]
        table.append(cells + values)
    return harness.markdown_table("", header, table)


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for cell in cells(args):
        rows.append(measure(args, *cell))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    harness.write_results(args, {"cells": rows}, markdown(rows), argv)


if __name__ == "__main__":
    main()
