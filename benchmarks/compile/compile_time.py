"""What a layer costs before its first step: graph size, tracing, XLA compile.

For MultiHeadAttention and DoublyNormalizedAttention (whole score matrix),
each in a fresh process: traces a forward+backward step
(`tf.function(jit_compile=True)`, gradients in the input and the weights),
counts the nodes of its graph (the step's and those of the functions it
calls: load-independent), times the trace, the first call (XLA compiles
it) and a later call. XLA compiles every branch of a conditional, so the
causal layer's exact (log-space) path is compiled whether it runs or not.

    python -m benchmarks.compile.compile_time --lengths 16 128 512
"""

import argparse
import os
import time

from benchmarks import harness
from benchmarks.speed.layer_step import self_attention_step

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
LAYERS = ("mha", "dna")


def step_parser(description, lengths, tokens, output):
    """The options of a benchmark over one layer's compiled
    forward+backward step (`compile_time.py`, `xla_memory.py`)."""
    p = harness.parser(description, output)
    p.add_argument("--lengths", type=int, nargs="+", default=lengths)
    p.add_argument("--tokens", type=int, default=tokens, help="tokens per batch (batch = tokens / length)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--causal", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    return p


def parse_args(argv=None):
    return step_parser(__doc__.splitlines()[0], [16, 128, 512], 2048,
                       "compile/compile_time").parse_args(argv)


def _graph_nodes(concrete):
    graph = concrete.graph.as_graph_def()
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


def measure(settings, layer_name, length, causal):
    """Trace, first and later call of one layer's step; run in its own
    process, so that nothing was traced or compiled before."""
    step, x, batch = self_attention_step(argparse.Namespace(**settings), layer_name, length, causal)
    call = harness.blocking(step)
    start = time.perf_counter()
    concrete = step.get_concrete_function(x, x)
    traced = time.perf_counter()
    call(x, x)
    first = time.perf_counter()
    call(x, x)
    later = time.perf_counter()
    return {"batch": batch, "nodes": _graph_nodes(concrete), "trace_s": traced - start,
            "first_call_s": first - traced, "later_call_s": later - first}


def _measured(args, name, length, causal):
    cell = harness.in_subprocess(measure, vars(args), name, length, causal, backend="tensorflow")
    if "error" in cell:
        raise RuntimeError(f"{name} at T={length}: {cell['error']}")
    return cell


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for length in args.lengths:
        for causal in args.causal:
            cells = {name: _measured(args, name, length, causal == "yes") for name in LAYERS}
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
    harness.write_results(args, {"rows": rows}, "\n".join(lines), argv)


if __name__ == "__main__":
    main()
