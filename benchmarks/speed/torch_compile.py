"""First call and recompilations of layers under `torch.compile`, PyTorch.

MultiHeadAttention and DoublyNormalizedAttention (fused path, the default on
PyTorch) on the same weights, self-attention on `(batch, length, width)`
float32, wrapped `torch.compile(lambda x: layer(x, x))` (Inductor) and
called --calls times with identical inputs. Each cell runs in a fresh
process with an empty Inductor cache (a cold compile); the cells of the
two layers alternate (drift on a shared machine hits both alike). Per
cell: the first call's seconds (trace and compile), the median of the later
calls, the frames compiled on the first call and after it (a recompiled
identical call), and the graph breaks. Steps: `forward`, and `train`
(forward+backward, gradients in the input and the weights).

    python -m benchmarks.speed.torch_compile
"""

import statistics
import tempfile
import time

from benchmarks import harness

LAYERS = ("mha", "dna")


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "speed/torch_compile")
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--key-dim", type=int, default=8)
    p.add_argument("--steps", nargs="+", choices=["forward", "train"], default=["forward", "train"])
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="processes per layer and step")
    return p.parse_args(argv)


def compile_cell(settings, layer_name, step_name):
    """One layer's compiled step, called `calls` times; run in its own
    process."""
    import keras
    import numpy as np
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from keras_dna import DoublyNormalizedAttention

    keras.utils.set_random_seed(0)
    layer_class = DoublyNormalizedAttention if layer_name == "dna" else keras.layers.MultiHeadAttention
    layer = layer_class(settings["heads"], settings["key_dim"])
    shape = (settings["batch"], settings["length"], settings["width"])
    x = torch.tensor(np.random.default_rng(0).normal(size=shape).astype("float32"))
    layer(x, x)  # builds the layer, eagerly

    if step_name == "forward":
        def step(x):
            return layer(x, x)
    else:
        weights = [w.value for w in layer.trainable_weights]

        def step(x):
            x = x.detach().requires_grad_(True)
            loss = layer(x, x).square().sum()
            return torch.autograd.grad(loss, [x] + weights)

    counter = CompileCounterWithBackend("inductor")
    counters.clear()
    compiled = torch.compile(step, backend=counter)
    seconds, frames = [], []
    for _ in range(settings["calls"]):
        start = time.perf_counter()
        compiled(x)
        seconds.append(time.perf_counter() - start)
        frames.append(counter.frame_count)
    return {
        "first_s": seconds[0],
        "later_s": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
        "frames_first": frames[0],
        "recompiled_frames": frames[-1] - frames[0],
        "recompiled_calls": [i + 1 for i in range(1, len(frames)) if frames[i] > frames[i - 1]],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def main(argv=None):
    args = parse_args(argv)
    settings = vars(args)
    rows, cells = [], {}
    for step_name in args.steps:
        for _ in range(args.repeats):
            for layer_name in LAYERS:
                with tempfile.TemporaryDirectory() as cache:
                    result = harness.in_subprocess(
                        compile_cell, settings, layer_name, step_name, backend="torch",
                        environment={"TORCHINDUCTOR_CACHE_DIR": cache},
                    )
                print(step_name, layer_name, result, flush=True)
                cells.setdefault((step_name, layer_name), []).append(result)
        runs = {name: cells[(step_name, name)] for name in LAYERS}
        errors = [r["error"] for results in runs.values() for r in results if "error" in r]
        if errors:
            rows.append([step_name, "error: " + errors[0]] + [""] * 7)
            continue
        ratios = [d["first_s"] / m["first_s"] for d, m in zip(runs["dna"], runs["mha"])]
        for name, results in runs.items():
            rows.append([
                step_name, name,
                f"{statistics.median(r['first_s'] for r in results):.1f}",
                f"{statistics.median(ratios):.2f}" if name == "dna" else "",
                f"{statistics.median(r['later_s'] for r in results) * 1e3:.1f}",
                str(max(r["frames_first"] for r in results)),
                str(max(r["recompiled_frames"] for r in results)),
                ",".join(sorted({str(c) for r in results for c in r["recompiled_calls"]})) or "-",
                str(max(r["graph_breaks"] for r in results)),
            ])
    table = harness.markdown_table(
        f"torch.compile (Inductor), batch {args.batch}, length {args.length}, width {args.width}, "
        f"{args.heads} heads of {args.key_dim}, float32, {args.calls} identical calls, "
        f"median of {args.repeats} cold processes per cell",
        ["step", "layer", "first call s", "first call DNA/MHA", "later calls ms",
         "frames compiled (first call)", "frames recompiled (later calls)", "recompiled on call",
         "graph breaks"],
        rows,
    )
    data = {"cells": {f"{s}/{n}": r for (s, n), r in cells.items()}}
    harness.write_results(args, data, table)


if __name__ == "__main__":
    main()
