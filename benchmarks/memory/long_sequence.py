"""Peak memory and time of one forward+backward step at long sequence lengths.

Self-attention of a whole layer (width heads * head_dim), batch 1, XLA on,
float32: MultiHeadAttention, DoublyNormalizedAttention, and
DoublyNormalizedAttention with `chunk_size` (by default `"auto"`, which the
layer takes unless told otherwise). Each setting runs in its own
process, which reports its peak resident memory; a process that dies (for
instance killed for lack of memory, or stopped by --memory-limit-gib) is
reported as failed.

    python -m benchmarks.memory.long_sequence --lengths 4096 8192 16384
"""

import argparse
import os

from benchmarks import harness
from benchmarks.speed import layer_step

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _chunk_size(text):
    return text if text == "auto" else int(text)


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "memory/long_sequence")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk-size", type=_chunk_size, default="auto",
                   help="the chunked layer's chunk_size: a positive integer or auto")
    p.add_argument("--layers", nargs="+", choices=["mha", "dna", "dna_chunked"],
                   default=["mha", "dna", "dna_chunked"])
    p.add_argument("--causal", action="store_true", help="use_causal_mask=True")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-limit-gib", type=float, default=22.0,
                   help="address-space limit of each process, so that a layer that needs "
                        "more fails instead of exhausting the machine")
    return p.parse_args(argv)


def run_one(settings, which, length):
    """Peak memory and median time of one layer's step; run in its own
    process, which holds nothing else."""
    settings = argparse.Namespace(**settings)
    width = settings.heads * settings.head_dim
    step_settings = argparse.Namespace(
        tokens=length, width=width, heads=settings.heads, dtype="float32",
        chunk_size=str(settings.chunk_size) if which == "dna_chunked" else None)
    query, _, _ = layer_step.inputs(step_settings, length, "self")
    layer, _ = layer_step.variants(step_settings, "tensorflow", "xla", False)[which]
    harness.build_with_same_weights({which: layer}, query.shape)
    step = layer_step.layer_steps(layer, "xla", {"use_causal_mask": settings.causal})
    call = harness.blocking(lambda: step["forward_backward"](query, query))
    timing = harness.time_interleaved({which: call}, settings.repeats, warmup=1)
    return {"peak_gib": harness.peak_memory_gib(), "seconds": timing["steps"][which]["median_s"]}


def markdown(args, rows):
    lines = ["| T = S | layer | peak GiB | fwd+bwd s |", "|---|---|---|---|"]
    for r in rows:
        name = r["layer"] + (f" (chunk_size={args.chunk_size})" if r["layer"] == "dna_chunked" else "")
        if "error" in r:
            lines.append(f"| {r['length']} | {name} | failed: {r['error']} | |")
        else:
            lines.append(f"| {r['length']} | {name} | {r['peak_gib']:.2f} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for length in args.lengths:
        for which in args.layers:
            row = {"length": length, "layer": which}
            row.update(harness.in_subprocess(run_one, vars(args), which, length, backend="tensorflow",
                                             memory_limit_gib=args.memory_limit_gib))
            rows.append(row)
            print(markdown(args, rows[-1:]).splitlines()[-1], flush=True)
    harness.write_results(args, {"rows": rows}, markdown(args, rows), argv)


if __name__ == "__main__":
    main()
