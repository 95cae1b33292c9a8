"""What a layer costs before its first step: graph size, tracing, XLA compile.

For MultiHeadAttention and DoublyNormalizedAttention (whole score matrix),
each in a fresh process: traces a forward+backward step
(`tf.function(jit_compile=True)`, gradients in the input and the weights),
counts the nodes of its graph (the step's and those of the functions it
calls: load-independent), times the trace, the first call (XLA compiles
it) and a later call. XLA compiles every branch of a conditional, so the
causal layer's exact (log-space) path is compiled whether it runs or not.

    python benchmarks/compile_time.py --lengths 16 128 512 --output benchmarks/results/compile_time
"""

import argparse
import json
import os
import subprocess
import sys
import time

from _results import write_results
from _steps import forward_backward_step
from _steps import step_parser

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
LAYERS = ("mha", "dna")


def parse_args(argv=None):
    p = step_parser(__doc__.splitlines()[0], lengths=[16, 128, 512], tokens=2048, output="benchmarks/results/compile_time")
    # Internal: measure one layer in this process.
    p.add_argument("--measure", nargs=3, metavar=("LAYER", "LENGTH", "CAUSAL"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _graph_nodes(concrete):
    graph = concrete.graph.as_graph_def()
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


def measure_in_process(args, layer_name, length, causal):
    forward_backward, x, batch = forward_backward_step(args, layer_name, length, causal)

    start = time.perf_counter()
    concrete = forward_backward.get_concrete_function(x)
    traced = time.perf_counter()
    [g.numpy() for g in forward_backward(x)]
    first = time.perf_counter()
    [g.numpy() for g in forward_backward(x)]
    later = time.perf_counter()
    return {"batch": batch, "nodes": _graph_nodes(concrete), "trace_s": traced - start,
            "first_call_s": first - traced, "later_call_s": later - first}


def measure(args, layer_name, length, causal):
    command = [sys.executable, __file__, "--measure", layer_name, str(length), causal,
               "--tokens", str(args.tokens), "--width", str(args.width), "--heads", str(args.heads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.measure:
        layer_name, length, causal = args.measure
        print(json.dumps(measure_in_process(args, layer_name, int(length), causal == "yes")))
        return
    rows = []
    for length in args.lengths:
        for causal in args.causal:
            cells = {name: measure(args, name, length, causal) for name in LAYERS}
            rows.append({"length": length, "causal": causal == "yes", "batch": cells["mha"]["batch"],
                         **{f"{n}_{k}": v for n in LAYERS for k, v in cells[n].items() if k != "batch"}})
    lines = ["| T | batch | causal | graph nodes MHA | graph nodes DNA | trace s MHA | trace s DNA | "
             "first call s MHA | first call s DNA | later call s MHA | later call s DNA |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['batch']} | {r['causal']} | {r['mha_nodes']} | {r['dna_nodes']} | "
            + " | ".join(f"{r[f'mha_{k}']:.2f} | {r[f'dna_{k}']:.2f}"
                         for k in ("trace_s", "first_call_s", "later_call_s")) + " |"
        )
    write_results(args.output, "compile_time.py", argv, {"settings": vars(args), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
