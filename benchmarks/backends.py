"""DoublyNormalizedAttention against MultiHeadAttention on each Keras backend.

The grid of `attention_benchmark.py` (whole layers, same weights, batches of
--tokens tokens, self- and cross-attention, causal and not), timed under
JAX and PyTorch as users of those backends run a layer:

- JAX, `jit`: forward and forward+backward (`jax.grad` of the summed
  squared output, in the inputs and the weights) inside `jax.jit`, through
  `layer.stateless_call`, as Keras' JAX trainer compiles a step;
- JAX, `eager`: the same functions without `jit` (op by op);
- PyTorch, `eager`: a forward under `torch.no_grad`, and a forward with
  `torch.autograd.grad` (Keras' PyTorch trainer does not compile by
  default).

Each cell runs in its own process (`KERAS_BACKEND` set for it), times the
layers interleaved and reports medians and the ratio DNA/MHA. Keras'
`MultiHeadAttention` hands its attention to `keras.ops.dot_product_attention`,
which on PyTorch is `scaled_dot_product_attention`, a fused kernel that never
writes the score matrix; `MHA with scores` (`return_attention_scores=True`,
as `MultiHeadAttention` also runs with dropout) writes it, as DNA must.

    python benchmarks/backends.py --backends jax torch --output benchmarks/results/results_backends
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

from _results import write_results

MODES = {"jax": ("jit", "eager"), "torch": ("eager",)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", choices=sorted(MODES), default=["jax", "torch"])
    p.add_argument("--modes", nargs="+", choices=["jit", "eager"], default=["jit", "eager"])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (batch = tokens / length)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--attention", nargs="+", choices=["self", "cross"], default=["self", "cross"])
    p.add_argument("--causal", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default="benchmarks/results/results_backends")
    # Internal: run one cell in this process.
    p.add_argument("--cell", nargs=4, metavar=("MODE", "LENGTH", "ATTENTION", "CAUSAL"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _layers_and_inputs(args, length, attention, causal):
    import keras
    import numpy as np

    import keras_dna

    batch = max(1, args.tokens // length)
    rng = np.random.default_rng(0)
    query = rng.normal(size=(batch, length, args.width)).astype("float32")
    value = query if attention == "self" else rng.normal(size=query.shape).astype("float32")
    head_dim = args.width // args.heads
    mha = keras.layers.MultiHeadAttention(args.heads, head_dim)
    # Cross-attention in a decoder is not causally masked, only normalized.
    dna = keras_dna.DoublyNormalizedAttention(
        args.heads, head_dim, chunk_size=None,
        causal_normalization=(causal and attention == "cross"),
    )
    for layer in (mha, dna):
        layer(query, value)
    dna.set_weights(mha.get_weights())
    return {"mha": mha, "dna": dna, "mha_with_scores": mha}, query, value, batch


def _jax_steps(layer, use_causal_mask, jit, with_scores):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(weights, query, value):
        output, _ = layer.stateless_call(
            weights, non_trainable, query, value, use_causal_mask=use_causal_mask,
            return_attention_scores=with_scores,
        )
        return output[0] if with_scores else output

    def loss(weights, query, value):
        return jnp.sum(jnp.square(forward(weights, query, value)))

    steps = {"forward": forward, "forward_backward": jax.grad(loss, argnums=(0, 1, 2))}
    if jit:
        steps = {name: jax.jit(step) for name, step in steps.items()}
    return {
        name: lambda q, v, step=step: jax.block_until_ready(step(trainable, q, v))
        for name, step in steps.items()
    }


def _torch_steps(layer, use_causal_mask, with_scores):
    import torch

    weights = [v.value for v in layer.trainable_variables]

    def output(query, value):
        result = layer(query, value, use_causal_mask=use_causal_mask,
                       return_attention_scores=with_scores)
        return result[0] if with_scores else result

    def forward(query, value):
        with torch.no_grad():
            return output(query, value)

    def forward_backward(query, value):
        query, value = (x.detach().requires_grad_(True) for x in (query, value))
        loss = torch.sum(torch.square(output(query, value)))
        return torch.autograd.grad(loss, [query, value] + weights)

    return {"forward": forward, "forward_backward": forward_backward}


def time_cell(args, mode, length, attention, causal):
    import keras
    import numpy as np

    layers, query, value, batch = _layers_and_inputs(args, length, attention, causal)
    query, value = keras.ops.convert_to_tensor(query), keras.ops.convert_to_tensor(value)
    use_causal_mask = causal and attention == "self"
    backend = keras.backend.backend()
    result = {"length": length, "batch": batch}
    for step in ("forward", "forward_backward"):
        fns = {}
        for name, layer in layers.items():
            with_scores = name == "mha_with_scores"
            if backend == "jax":
                steps = _jax_steps(layer, use_causal_mask, mode == "jit", with_scores)
            else:
                steps = _torch_steps(layer, use_causal_mask, with_scores)
            fns[name] = steps[step]
        for fn in fns.values():
            fn(query, value)  # compile and warm up
            fn(query, value)
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():  # interleaved: drift hits both alike
                start = time.perf_counter()
                fn(query, value)
                times[name].append(time.perf_counter() - start)
        medians = {name: float(np.median(t)) for name, t in times.items()}
        result[step] = {f"{name}_s": seconds for name, seconds in medians.items()}
        result[step]["ratio"] = medians["dna"] / medians["mha"]
        result[step]["ratio_with_scores"] = medians["dna"] / medians["mha_with_scores"]
    return result


def _cell_in_subprocess(args, backend, mode, length, attention, causal):
    command = [sys.executable, __file__, "--cell", mode, str(length), attention, causal,
               "--tokens", str(args.tokens), "--width", str(args.width),
               "--heads", str(args.heads), "--repeats", str(args.repeats)]
    environment = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["failed"]
        return {"error": lines[-1][:120]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(rows):
    lines = [
        "| backend | mode | T | batch | attention | causal | forward DNA/MHA | fwd+bwd DNA/MHA "
        "| forward DNA/MHA with scores | fwd+bwd DNA/MHA with scores "
        "| forward MHA ms | fwd+bwd MHA ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['backend']} | {r['mode']} | {r['length']} | {r.get('batch', '')} | " \
               f"{r['attention']} | {r['causal']} | "
        if "error" in r:
            lines.append(head + f"{r['error']} | | | | | |")
            continue
        cells = [f"{r[s][k]:.2f}" for k in ("ratio", "ratio_with_scores")
                 for s in ("forward", "forward_backward")]
        cells += [f"{r[s]['mha_s'] * 1e3:.0f}" for s in ("forward", "forward_backward")]
        lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.cell:
        mode, length, attention, causal = args.cell
        print(json.dumps(time_cell(args, mode, int(length), attention, causal == "yes")))
        return
    rows = []
    for backend in args.backends:
        modes = [m for m in MODES[backend] if m in args.modes]
        for mode, length, attention, causal in itertools.product(
            modes, args.lengths, args.attention, args.causal
        ):
            row = _cell_in_subprocess(args, backend, mode, length, attention, causal)
            row.update({"backend": backend, "mode": mode, "length": length,
                        "attention": attention, "causal": causal == "yes"})
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("cell", "output")}
    write_results(args.output, "backends.py", argv, {"settings": settings, "cells": rows},
                  markdown(rows))


if __name__ == "__main__":
    main()
