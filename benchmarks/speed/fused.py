"""DoublyNormalizedAttention on fused kernels against MultiHeadAttention, PyTorch.

On PyTorch, `MultiHeadAttention` runs `scaled_dot_product_attention`, a fused
kernel, on CPUs too; non-causal DNA layers run on the same kernel
(`keras_dna.ops.fused`), causal ones write the scores. Whole layers (width
512, 8 heads, batches of --tokens tokens, self-attention), same weights,
float32, each cell in its own process:

- time: forward (`torch.no_grad`) and forward+backward (gradients in the
  inputs and weights), interleaved, medians, ratio DNA/MHA
  (`backends.py`'s cells);
- peak memory: the growth of the process's peak resident memory over one
  forward+backward, from a fresh process per layer (the median of
  --memory-repeats processes: the allocator makes single runs noisy),
  ratio DNA/MHA;
- floor: the attention alone (batch of --tokens tokens, 8 heads of 64):
  `keras.ops.dot_product_attention` once, twice (the floor of any two-pass
  forward), and `keras_dna.ops.doubly_normalized_attention`, in one process;
- long: one training step (forward, backward, SGD update) at
  --long-length, batch 1, for each layer: time and peak memory, next to the
  size one float32 score matrix would take.

    python benchmarks/fused.py --output benchmarks/results/fused
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _results import markdown_table
from _results import write_results
from backends import _cell_in_subprocess


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--causal", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    # Causal layers write their scores: a cell at 4096 takes many minutes.
    p.add_argument("--causal-lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-repeats", type=int, default=3)
    p.add_argument("--long-length", type=int, default=16384)
    p.add_argument("--no-long", action="store_true", help="skip the training step at --long-length")
    p.add_argument("--output", default="benchmarks/results/fused")
    # Internal: one memory or long cell in this process.
    p.add_argument("--memory-cell", nargs=4, metavar=("LAYER", "LENGTH", "CAUSAL", "TRAIN"),
                   help=argparse.SUPPRESS)
    p.add_argument("--floor-cell", type=int, metavar="LENGTH", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def floor_cell(args, length):
    """Attention alone: the kernel once and twice, and fused DNA, forward
    and forward+backward, medians of interleaved runs, in ms."""
    import keras
    import numpy as np
    import torch

    from keras_dna import ops as dna_ops

    batch = max(1, args.tokens // length)
    shape = (batch, length, args.heads, args.width // args.heads)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))

    def kernel():
        return keras.ops.dot_product_attention(q, k, v)

    def twice():
        return kernel() + keras.ops.dot_product_attention(k, q, v)

    steps = {"kernel": kernel, "kernel_twice": twice,
             "dna": lambda: dna_ops.doubly_normalized_attention(q, k, v)}
    result = {}
    for mode in ("forward", "forward_backward"):
        def run(step):
            if mode == "forward":
                with torch.no_grad():
                    return step()
            return torch.autograd.grad(step().square().sum(), [q, k, v])

        times = {name: [] for name in steps}
        for name, step in steps.items():
            run(step)
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                run(step)
                times[name].append(time.perf_counter() - start)
        result[mode] = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    return result


def _floor_in_subprocess(args, length):
    command = [sys.executable, __file__, "--floor-cell", str(length), "--tokens", str(args.tokens),
               "--width", str(args.width), "--heads", str(args.heads), "--repeats", str(args.repeats)]
    result = subprocess.run(command, capture_output=True, text=True,
                            env=dict(os.environ, KERAS_BACKEND="torch"))
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["failed"]
        return {"error": lines[-1][:120]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_cell(args, layer_name, length, causal, train):
    """Peak memory growth (and time) of one forward+backward, or one SGD
    step with `train`, in a fresh process."""
    import keras
    import numpy as np
    import torch

    import keras_dna

    torch.set_grad_enabled(True)
    batch = 1 if train else max(1, args.tokens // length)
    head_dim = args.width // args.heads
    if layer_name == "mha":
        layer = keras.layers.MultiHeadAttention(args.heads, head_dim)
    else:
        layer = keras_dna.DoublyNormalizedAttention(args.heads, head_dim, chunk_size=None)
    rng = np.random.default_rng(0)
    query = torch.tensor(rng.normal(size=(batch, length, args.width)).astype("float32"))
    layer(query[:, :8], query[:, :8])
    weights = [v.value for v in layer.trainable_variables]
    query.requires_grad_(True)
    before = _peak_rss_bytes()
    start = time.perf_counter()
    loss = torch.sum(torch.square(layer(query, query, use_causal_mask=causal)))
    grads = torch.autograd.grad(loss, [query] + weights)
    if train:
        with torch.no_grad():
            for weight, grad in zip(weights, grads[1:]):
                weight.sub_(1e-3 * grad)
    seconds = time.perf_counter() - start
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    return {"peak_growth_bytes": _peak_rss_bytes() - before, "seconds": seconds,
            "finite": finite, "batch": batch}


def _memory_in_subprocess(args, layer, length, causal, train):
    command = [sys.executable, __file__, "--memory-cell", layer, str(length),
               "yes" if causal else "no", "yes" if train else "no",
               "--tokens", str(args.tokens), "--width", str(args.width),
               "--heads", str(args.heads)]
    environment = dict(os.environ, KERAS_BACKEND="torch")
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["failed"]
        return {"error": lines[-1][:120]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median_memory(args, layer, length, causal):
    """The cell whose peak growth is the median of --memory-repeats runs."""
    cells = [_memory_in_subprocess(args, layer, length, causal, False)
             for _ in range(args.memory_repeats)]
    if any("error" in cell for cell in cells):
        return next(cell for cell in cells if "error" in cell)
    cells.sort(key=lambda cell: cell["peak_growth_bytes"])
    return cells[len(cells) // 2]


def _time_args(args):
    return argparse.Namespace(tokens=args.tokens, width=args.width, heads=args.heads,
                              repeats=args.repeats)


def _ratio(dna, mha, key):
    if "error" in dna or "error" in mha:
        return "error"
    return f"{dna[key] / mha[key]:.2f}"


def main(argv=None):
    args = parse_args(argv)
    if args.floor_cell:
        print(json.dumps(floor_cell(args, args.floor_cell)))
        return
    if args.memory_cell:
        layer, length, causal, train = args.memory_cell
        print(json.dumps(memory_cell(args, layer, int(length), causal == "yes", train == "yes")))
        return
    rows, table = [], []
    for causal in args.causal:
        for length in args.causal_lengths if causal == "yes" else args.lengths:
            timing = _cell_in_subprocess(_time_args(args), "torch", "eager", length, "self", causal)
            memory = {name: _median_memory(args, name, length, causal == "yes")
                      for name in ("mha", "dna")}
            row = {"length": length, "causal": causal == "yes", "timing": timing, "memory": memory}
            rows.append(row)
            cells = ["error"] * 4 if "error" in timing else [
                f"{timing['forward']['ratio']:.2f}", f"{timing['forward_backward']['ratio']:.2f}",
                f"{timing['forward']['mha_s'] * 1e3:.0f}",
                f"{timing['forward_backward']['mha_s'] * 1e3:.0f}",
            ]
            table.append([str(length), causal, str(timing.get("batch", ""))] + cells + [
                _ratio(memory["dna"], memory["mha"], "peak_growth_bytes"),
            ])
            print(" | ".join(table[-1]), flush=True)
    floor_rows, floors = [], {}
    for length in args.lengths:
        floors[length] = cell = _floor_in_subprocess(args, length)
        if "error" in cell:
            floor_rows.append([str(length), cell["error"], "", "", ""])
            continue
        floor_rows.append([str(length)] + [
            f"{cell[mode][name] / cell[mode]['kernel']:.2f}"
            for mode in ("forward", "forward_backward") for name in ("kernel_twice", "dna")
        ])
    long = {} if args.no_long else {
        name: _memory_in_subprocess(args, name, args.long_length, False, True)
        for name in ("mha", "dna")
    }
    score_bytes = args.heads * args.long_length**2 * 4
    long_rows = [
        [name, str(args.long_length), f"{cell['seconds']:.1f}",
         f"{cell['peak_growth_bytes'] / 2**20:.0f}", f"{score_bytes / 2**20:.0f}", str(cell["finite"])]
        if "error" not in cell else [name, str(args.long_length), cell["error"], "", "", ""]
        for name, cell in long.items()
    ]
    tables = [markdown_table(
        "Whole layers, PyTorch on this CPU, float32, self-attention, DNA/MHA:",
        ["T", "causal", "batch", "forward", "fwd+bwd", "forward MHA ms", "fwd+bwd MHA ms",
         "peak memory"],
        table,
    )]
    tables.append(markdown_table(
        "The attention alone, non-causal, against one kernel call:",
        ["T", "forward: kernel twice", "forward: DNA", "fwd+bwd: kernel twice", "fwd+bwd: DNA"],
        floor_rows,
    ))
    if long_rows:
        tables.append(markdown_table(
            "One SGD step, non-causal, batch 1:",
            ["layer", "T", "seconds", "peak growth MiB", "one score matrix MiB", "finite"],
            long_rows,
        ))
    text = "\n\n".join(tables)
    settings = {k: v for k, v in vars(args).items() if k not in ("memory_cell", "output")}
    write_results(args.output, "fused.py", argv,
                  {"settings": settings, "cells": rows, "floor": floors, "long": long}, text)


if __name__ == "__main__":
    main()
