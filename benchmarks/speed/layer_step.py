"""Times DoublyNormalizedAttention against keras.layers.MultiHeadAttention.

Whole layers with the same weights, shapes and dtype, compiled with XLA
(`tf.function(jit_compile=True)`), forward and forward+backward, self- and
cross-attention, causal and not, over a grid of sequence lengths; with
--outer graph the steps run as plain (uncompiled) TensorFlow graphs, as Keras'
`fit` does on CPUs, and DNA is timed with its normalization compiled
(`jit_compile="auto"`, the default) and not. Batches hold
a fixed number of tokens (--tokens), so long sequences fit in memory. Each
cell runs in its own process: one process times both layers, interleaving
their repetitions, and reports medians and the ratio DNA/MHA; two more
processes (one per layer) measure the peak resident memory of a
forward+backward step. Writes JSON and a markdown table.

    python benchmarks/attention_benchmark.py --lengths 128 512 2048 --output benchmarks/results/results
"""

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

from _results import write_results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (batch = tokens / length)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention", nargs="+", choices=["self", "cross"], default=["self", "cross"])
    p.add_argument("--causal", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--outer", choices=["xla", "graph"], default="xla",
                   help="compile each whole step with XLA, or run it as a plain graph")
    p.add_argument("--chunk-size", default=None,
                   help="also time DNA with this chunk_size (an integer or 'auto')")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--output", default="benchmarks/results/results", help="writes OUTPUT.json and OUTPUT.md")
    # Internal: run one cell in this process.
    p.add_argument("--cell", nargs=3, metavar=("LENGTH", "ATTENTION", "CAUSAL"), help=argparse.SUPPRESS)
    p.add_argument("--memory-of", choices=["mha", "dna", "dna_uncompiled", "dna_chunked"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _layers_and_inputs(args, length, attention, causal):
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_dna

    batch = max(1, args.tokens // length)
    rng = np.random.default_rng(0)
    query = tf.constant(rng.normal(size=(batch, length, args.width)), args.dtype)
    # Cross-attention reads a source of the same length, as in translation.
    value = query if attention == "self" else tf.constant(
        rng.normal(size=(batch, length, args.width)), args.dtype
    )
    head_dim = args.width // args.heads
    mha = keras.layers.MultiHeadAttention(args.heads, head_dim, dtype=args.dtype)
    mha(query, value)
    layers = {"mha": mha}
    for name, jit_compile in (("dna", "auto"), ("dna_uncompiled", False)):
        # The whole score matrix: --chunk-size adds the layer with blocks.
        layers[name] = keras_dna.DoublyNormalizedAttention(
            args.heads, head_dim, dtype=args.dtype, jit_compile=jit_compile, chunk_size=None,
            causal_normalization=(causal and attention == "cross"),
        )
        layers[name](query, value)
        layers[name].set_weights(mha.get_weights())
    if args.chunk_size is not None:
        chunk_size = args.chunk_size if args.chunk_size == "auto" else int(args.chunk_size)
        layers["dna_chunked"] = keras_dna.DoublyNormalizedAttention(
            args.heads, head_dim, dtype=args.dtype, chunk_size=chunk_size,
            causal_normalization=(causal and attention == "cross"),
        )
        layers["dna_chunked"](query, value)
        layers["dna_chunked"].set_weights(mha.get_weights())
    if args.outer == "xla":
        del layers["dna_uncompiled"]  # inside XLA the setting makes no difference
    # Cross-attention in a decoder is not causally masked, only normalized.
    use_causal_mask = causal and attention == "self"
    return layers, query, value, use_causal_mask, batch


def _step_functions(layer, use_causal_mask, outer):
    import tensorflow as tf

    @tf.function(jit_compile=outer == "xla")
    def forward(query, value):
        return layer(query, value, use_causal_mask=use_causal_mask)

    @tf.function(jit_compile=outer == "xla")
    def forward_backward(query, value):
        with tf.GradientTape() as tape:
            tape.watch([query, value])
            loss = tf.reduce_sum(tf.square(layer(query, value, use_causal_mask=use_causal_mask)))
        return tape.gradient(loss, [query, value] + layer.trainable_weights)

    return {"forward": forward, "forward_backward": forward_backward}


def _run(fn, query, value):
    import tensorflow as tf

    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), fn(query, value))
    return time.perf_counter() - start


def time_cell(args, length, attention, causal):
    import numpy as np

    layers, query, value, use_causal_mask, batch = _layers_and_inputs(args, length, attention, causal)
    result = {"length": length, "batch": batch, "attention": attention, "causal": causal}
    for step in ("forward", "forward_backward"):
        fns = {
            name: _step_functions(layer, use_causal_mask, args.outer)[step]
            for name, layer in layers.items()
        }
        for fn in fns.values():
            _run(fn, query, value)  # compile and warm up
            _run(fn, query, value)
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():  # interleaved: drift hits both alike
                times[name].append(_run(fn, query, value))
        medians = {name: float(np.median(t)) for name, t in times.items()}
        result[step] = {f"{name}_s": seconds for name, seconds in medians.items()}
        result[step]["ratio"] = medians["dna"] / medians["mha"]
        for name in ("dna_uncompiled", "dna_chunked"):
            if name in medians:
                result[step][name.replace("dna_", "") + "_ratio"] = medians[name] / medians["mha"]
    return result


def memory_cell(args, length, attention, causal, which):
    layers, query, value, use_causal_mask, _ = _layers_and_inputs(args, length, attention, causal)
    # Measure only this layer: the other one was built but never run.
    _run(_step_functions(layers[which], use_causal_mask, args.outer)["forward_backward"], query, value)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB


def _subprocess(args, extra):
    command = [sys.executable, __file__, *extra,
               "--tokens", str(args.tokens), "--width", str(args.width), "--heads", str(args.heads),
               "--dtype", args.dtype, "--repeats", str(args.repeats), "--outer", args.outer]
    if args.chunk_size is not None:
        command += ["--chunk-size", args.chunk_size]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": _short_error(result.stderr)}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _short_error(stderr):
    """`ResourceExhaustedError: Out of memory ...` from a traceback."""
    lines = stderr.strip().splitlines()
    if not lines:
        return "failed"
    kind, _, message = lines[-1].partition(": ")
    return f"{kind.rsplit('.', 1)[-1]}: {message.split(' [Op:')[0]}"


def _ratio(value):
    return "-" if value is None else f"{value:.2f}"


def _gib(value):
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else "failed"


def _columns(rows):
    """(heading, value of a row) for the columns these rows have."""
    def has(key):
        return any(key in r.get("forward_backward", {}) for r in rows)

    def ratio(step, key):
        return lambda r: _ratio(r[step].get(key))

    columns = [
        ("forward DNA/MHA", ratio("forward", "ratio")),
        ("fwd+bwd DNA/MHA", ratio("forward_backward", "ratio")),
    ]
    if has("uncompiled_ratio"):
        columns.append(("fwd+bwd DNA/MHA, normalization not compiled",
                        ratio("forward_backward", "uncompiled_ratio")))
    if has("chunked_ratio"):
        columns += [("forward chunked/MHA", ratio("forward", "chunked_ratio")),
                    ("fwd+bwd chunked/MHA", ratio("forward_backward", "chunked_ratio"))]
    columns.append(("fwd+bwd MHA ms", lambda r: f"{r['forward_backward']['mha_s'] * 1e3:.0f}"))
    layers = ["mha", "dna"] + (["dna_chunked"] if has("chunked_ratio") else [])
    for layer in layers:
        columns.append((f"peak GiB {layer.upper().replace('_CHUNKED', ' chunked')}",
                        lambda r, layer=layer: _gib(r.get("peak_gib", {}).get(layer))))
    return columns


def markdown(rows):
    columns = _columns([r for r in rows if "error" not in r])
    lines = [
        "| T | batch | attention | causal | " + " | ".join(h for h, _ in columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for r in rows:
        if "error" in r:
            # The timing failed; memory, measured apart, may not have.
            cells = [value(r) if heading.startswith("peak") else "" for heading, value in columns]
            cells[0] = r["error"]
        else:
            cells = [value(r) for _, value in columns]
        lines.append(f"| {r['length']} | {r.get('batch', '')} | {r['attention']} | {r['causal']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.cell:
        length, attention, causal = int(args.cell[0]), args.cell[1], args.cell[2] == "yes"
        if args.memory_of:
            print(json.dumps(memory_cell(args, length, attention, causal, args.memory_of)))
        else:
            print(json.dumps(time_cell(args, length, attention, causal)))
        return
    rows = []
    for length, attention, causal in itertools.product(args.lengths, args.attention, args.causal):
        cell = ["--cell", str(length), attention, causal]
        row = _subprocess(args, cell)
        row.update({"length": length, "attention": attention, "causal": causal == "yes"})
        # Memory runs each layer alone, so it may succeed where the timing
        # process, holding both layers' compiled steps, ran out of memory.
        if not args.skip_memory:
            layers = ("mha", "dna") + (("dna_chunked",) if args.chunk_size else ())
            row["peak_gib"] = {
                which: _subprocess(args, cell + ["--memory-of", which]) for which in layers
            }
        rows.append(row)
        print(markdown([row]).splitlines()[-1], flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("cell", "memory_of", "output")}
    write_results(args.output, "attention_benchmark.py", argv,
                  {"settings": settings, "cells": rows}, markdown(rows))


if __name__ == "__main__":
    main()
