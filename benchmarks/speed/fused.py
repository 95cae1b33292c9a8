"""DoublyNormalizedAttention on fused kernels against MultiHeadAttention, PyTorch.

On PyTorch, `MultiHeadAttention` runs `scaled_dot_product_attention`, a fused
kernel, on CPUs too; non-causal DNA layers run on the same kernel
(`keras_dna.ops.fused`), causal ones write the scores. Whole layers (width
512, 8 heads, batches of --tokens tokens, self-attention), same weights,
float32, each cell in its own process:

- time: forward (`torch.no_grad`) and forward+backward (gradients in the
  inputs and weights), interleaved, medians, ratio DNA/MHA
  (`layer_step.py`'s cells);
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

    python -m benchmarks.speed.fused
"""

import argparse

from benchmarks import harness
from benchmarks.speed import layer_step

LAYERS = ("mha", "dna")


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "speed/fused")
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
    return p.parse_args(argv)


def floor_cell(settings, length):
    """Attention alone: the kernel once and twice, and fused DNA, forward
    and forward+backward, interleaved; run in its own process."""
    import keras
    import torch

    from keras_dna import ops as dna_ops

    batch = max(1, settings["tokens"] // length)
    shape = (batch, length, settings["heads"], settings["width"] // settings["heads"])
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    attention = {
        "kernel": lambda: keras.ops.dot_product_attention(q, k, v),
        "kernel_twice": lambda: (keras.ops.dot_product_attention(q, k, v)
                                 + keras.ops.dot_product_attention(k, q, v)),
        "dna": lambda: dna_ops.doubly_normalized_attention(q, k, v),
    }

    def forward(step):
        with torch.no_grad():
            return step()

    steps = {("forward", name): lambda f=f: forward(f) for name, f in attention.items()}
    steps.update({("forward_backward", name): lambda f=f: torch.autograd.grad(
        f().square().sum(), [q, k, v]) for name, f in attention.items()})
    ratios = {(mode, name): ((mode, name), (mode, "kernel"))
              for mode in ("forward", "forward_backward") for name in ("kernel_twice", "dna")}
    timing = harness.time_interleaved(steps, settings["repeats"], ratios, warmup=1)
    return {f"{mode} {name}": ratio["median"] for (mode, name), ratio in timing["ratios"].items()}


def memory_cell(settings, layer_name, length, causal, train):
    """Peak memory growth (and time) of one forward+backward, or one SGD
    step with `train`; run in its own process."""
    import time

    import torch

    torch.set_grad_enabled(True)
    batch = 1 if train else max(1, settings["tokens"] // length)
    step_settings = argparse.Namespace(**dict(settings, tokens=batch * length, dtype="float32",
                                              chunk_size=None))
    query, _, _ = layer_step.inputs(step_settings, length, "self")
    layer, _ = layer_step.variants(step_settings, "torch", "eager", False)[layer_name]
    harness.build_with_same_weights({layer_name: layer}, query.shape)
    weights = [v.value for v in layer.trainable_variables]
    before = harness.peak_memory_gib()
    start = time.perf_counter()
    query.requires_grad_(True)
    loss = torch.sum(torch.square(layer(query, query, use_causal_mask=causal)))
    grads = torch.autograd.grad(loss, [query] + weights)
    if train:
        with torch.no_grad():
            for weight, grad in zip(weights, grads[1:]):
                weight.sub_(1e-3 * grad)
    return {"peak_growth_bytes": (harness.peak_memory_gib() - before) * 2**30,
            "seconds": time.perf_counter() - start,
            "finite": all(bool(torch.isfinite(g).all()) for g in grads), "batch": batch}


def _median_memory(args, layer, length, causal):
    """The cell whose peak growth is the median of --memory-repeats
    processes: the allocator makes single runs noisy."""
    cells = [harness.in_subprocess(memory_cell, vars(args), layer, length, causal, False,
                                   backend="torch") for _ in range(args.memory_repeats)]
    if any("error" in cell for cell in cells):
        return next(cell for cell in cells if "error" in cell)
    cells.sort(key=lambda cell: cell["peak_growth_bytes"])
    return cells[len(cells) // 2]


def _timing(args, length, causal):
    settings = dict(vars(args), dtype="float32", chunk_size=None)
    return harness.in_subprocess(layer_step.time_cell, settings, "eager", length, "self",
                                 causal == "yes", backend="torch")


def _ratio(dna, mha, key):
    if "error" in dna or "error" in mha:
        return "error"
    return f"{dna[key] / mha[key]:.2f}"


def _layer_row(length, causal, timing, memory):
    cells = ["error"] * 4 if "error" in timing else [
        f"{timing[s]['ratios']['DNA/MHA']['median']:.2f}" for s in layer_step.STEPS
    ] + [f"{timing[s]['steps']['mha']['median_s'] * 1e3:.0f}" for s in layer_step.STEPS]
    return [str(length), causal, str(timing.get("batch", ""))] + cells + [
        _ratio(memory["dna"], memory["mha"], "peak_growth_bytes")]


def layer_table(args):
    rows, table = [], []
    for causal in args.causal:
        for length in args.causal_lengths if causal == "yes" else args.lengths:
            timing = _timing(args, length, causal)
            memory = {name: _median_memory(args, name, length, causal == "yes") for name in LAYERS}
            rows.append({"length": length, "causal": causal == "yes", "timing": timing,
                         "memory": memory})
            table.append(_layer_row(length, causal, timing, memory))
            print(" | ".join(table[-1]), flush=True)
    return rows, harness.markdown_table(
        "Whole layers, PyTorch on this CPU, float32, self-attention, DNA/MHA:",
        ["T", "causal", "batch", "forward", "fwd+bwd", "forward MHA ms", "fwd+bwd MHA ms",
         "peak memory"],
        table,
    )


def floor_table(args):
    floors = {length: harness.in_subprocess(floor_cell, vars(args), length, backend="torch")
              for length in args.lengths}
    columns = [f"{mode} {name}" for mode in ("forward", "forward_backward")
               for name in ("kernel_twice", "dna")]
    rows = [[str(length), cell["error"], "", "", ""] if "error" in cell else
            [str(length)] + [f"{cell[column]:.2f}" for column in columns]
            for length, cell in floors.items()]
    return floors, harness.markdown_table(
        "The attention alone, non-causal, against one kernel call:",
        ["T", "forward: kernel twice", "forward: DNA", "fwd+bwd: kernel twice", "fwd+bwd: DNA"],
        rows,
    )


def long_table(args):
    long = {name: harness.in_subprocess(memory_cell, vars(args), name, args.long_length, False,
                                        True, backend="torch") for name in LAYERS}
    score_bytes = args.heads * args.long_length**2 * 4
    rows = [
        [name, str(args.long_length), f"{cell['seconds']:.1f}",
         f"{cell['peak_growth_bytes'] / 2**20:.0f}", f"{score_bytes / 2**20:.0f}", str(cell["finite"])]
        if "error" not in cell else [name, str(args.long_length), cell["error"], "", "", ""]
        for name, cell in long.items()
    ]
    return long, harness.markdown_table(
        "One SGD step, non-causal, batch 1:",
        ["layer", "T", "seconds", "peak growth MiB", "one score matrix MiB", "finite"],
        rows,
    )


def main(argv=None):
    args = parse_args(argv)
    rows, layers = layer_table(args)
    floors, floor = floor_table(args)
    tables = [layers, floor]
    long = {}
    if not args.no_long:
        long, table = long_table(args)
        tables.append(table)
    harness.write_results(args, {"cells": rows, "floor": floors, "long": long},
                          "\n\n".join(tables), argv)


if __name__ == "__main__":
    main()
