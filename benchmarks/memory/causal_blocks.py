"""Causal DNA on PyTorch's CPU by blocks of queries, against MultiHeadAttention.

Causal DNA has no fused kernel on PyTorch; `chunk_size` bounds what it
holds at once. Per layer (MHA, then DNA whole and with each --chunk-sizes),
each in its own fresh processes, self-attention with `use_causal_mask=True`,
width 512, 8 heads, --tokens tokens per batch, float32, same weights:

- peak memory: the growth of the process's peak resident memory over its
  first forward+backward (gradients in the inputs and weights), the median
  of --memory-repeats processes;
- time: the median of --repeats further forward+backward steps in the same
  process.

Ratios are against MHA in the same run.

    python -m benchmarks.memory.causal_blocks
"""

import statistics
import time

from benchmarks import harness


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "memory/causal_blocks")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 64, 32])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-repeats", type=int, default=3)
    return p.parse_args(argv)


def cell(settings, name, chunk_size, length):
    """Peak growth over the first forward+backward, then the median time of
    --repeats more; run in its own process."""
    import keras
    import numpy as np
    import torch

    import keras_dna

    batch = max(1, settings["tokens"] // length)
    key_dim = settings["width"] // settings["heads"]
    x = torch.tensor(np.random.default_rng(0).normal(size=(batch, length, settings["width"])),
                     dtype=torch.float32)
    if name == "MHA":
        layer = keras.layers.MultiHeadAttention(settings["heads"], key_dim)
    else:
        layer = keras_dna.DoublyNormalizedAttention(settings["heads"], key_dim, chunk_size=chunk_size)
    harness.build_with_same_weights({name: layer}, x.shape)
    weights = [v.value for v in layer.trainable_variables]

    def step():
        query = x.clone().requires_grad_(True)
        loss = torch.sum(torch.square(layer(query, query, use_causal_mask=True)))
        return torch.autograd.grad(loss, [query] + weights)

    before = harness.peak_memory_gib()
    grads = step()
    growth = (harness.peak_memory_gib() - before) * 2**30
    times = []
    for _ in range(settings["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_growth_bytes": growth, "seconds": statistics.median(times), "batch": batch,
            "finite": all(bool(torch.isfinite(g).all()) for g in grads)}


def _median_cell(args, name, chunk_size, length):
    cells = [harness.in_subprocess(cell, vars(args), name, chunk_size, length, backend="torch")
             for _ in range(args.memory_repeats)]
    if any("error" in c for c in cells):
        return next(c for c in cells if "error" in c)
    cells.sort(key=lambda c: c["peak_growth_bytes"])
    return cells[len(cells) // 2]


def main(argv=None):
    args = parse_args(argv)
    layers = [("MHA", None), ("DNA", None)] + [("DNA", size) for size in args.chunk_sizes]
    rows, cells = [], []
    for length in args.lengths:
        measured = [(name, size, _median_cell(args, name, size, length)) for name, size in layers]
        mha = measured[0][2]
        for name, size, result in measured:
            cells.append({"length": length, "layer": name, "chunk_size": size, **result})
            if "error" in result:
                rows.append([str(length), name, str(size), result["error"], "", "", ""])
                continue
            rows.append([
                str(length), name, "whole" if size is None else str(size),
                f"{result['peak_growth_bytes'] / 2**20:.0f}",
                f"{result['peak_growth_bytes'] / mha['peak_growth_bytes']:.2f}",
                f"{result['seconds']:.2f}", f"{result['seconds'] / mha['seconds']:.2f}",
            ])
    table = harness.markdown_table(
        "Causal self-attention, PyTorch CPU, one forward+backward: peak memory growth (MiB) and "
        "time (s), and their ratios to MultiHeadAttention:",
        ["T", "layer", "chunk_size", "peak MiB", "/ MHA", "seconds", "/ MHA"], rows,
    )
    harness.write_results(args, {"cells": cells}, table, argv)


if __name__ == "__main__":
    main()
