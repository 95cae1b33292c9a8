"""Peak memory and time of one forward+backward step at long sequence lengths.

Self-attention of a whole layer (width heads * head_dim), batch 1, XLA on,
float32: MultiHeadAttention, DoublyNormalizedAttention, and
DoublyNormalizedAttention with `chunk_size` (by default `"auto"`, which the
layer takes unless told otherwise). Each setting runs in its own
process, which reports its peak resident memory; a process that dies (for
instance killed for lack of memory, or stopped by --memory-limit-gib) is
reported as failed.

    python benchmarks/long_sequence.py --lengths 4096 8192 16384
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

from _steps import self_attention_steps

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _chunk_size(text):
    return text if text == "auto" else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    p.add_argument("--output", default="benchmarks/results/long_sequence")
    p.add_argument("--run", nargs=2, metavar=("LAYER", "LENGTH"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_one(args, which, length):
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_dna

    width = args.heads * args.head_dim
    x = tf.constant(np.random.default_rng(0).normal(size=(1, length, width)), "float32")
    if which == "mha":
        layer = keras.layers.MultiHeadAttention(args.heads, args.head_dim)
    else:
        layer = keras_dna.DoublyNormalizedAttention(
            args.heads, args.head_dim,
            chunk_size=args.chunk_size if which == "dna_chunked" else None,
        )
    step = self_attention_steps(layer, args.causal)["forward_backward"]
    layer(x[:, :8], x[:, :8])
    times = []
    for _ in range(args.repeats + 1):  # the first call compiles
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), step(x))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"peak_gib": peak, "seconds": float(np.median(times[1:]))}


def _error(result):
    """The exception's name and message, or how the process ended."""
    for line in reversed(result.stderr.strip().splitlines()):
        kind, _, message = line.partition(": ")
        if kind.endswith(("Error", "Exception")):
            return f"{kind.rsplit('.', 1)[-1]}: {message.split(' [Op:')[0]}"
    if result.returncode < 0:
        return f"killed by signal {-result.returncode}"
    return f"exit code {result.returncode}"


def _limit_memory(gib):
    def apply():
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def main(argv=None):
    args = parse_args(argv)
    if args.run:
        print(json.dumps(run_one(args, args.run[0], int(args.run[1]))))
        return
    rows = []
    for length in args.lengths:
        for which in args.layers:
            command = [sys.executable, __file__, "--run", which, str(length),
                       "--heads", str(args.heads), "--head-dim", str(args.head_dim),
                       "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
            if args.causal:
                command.append("--causal")
            result = subprocess.run(command, capture_output=True, text=True,
                                    preexec_fn=_limit_memory(args.memory_limit_gib))
            row = {"length": length, "layer": which}
            if result.returncode == 0:
                row.update(json.loads(result.stdout.strip().splitlines()[-1]))
            else:
                row["error"] = _error(result)
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"Command: `python benchmarks/long_sequence.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        "| T = S | layer | peak GiB | fwd+bwd s |",
        "|---|---|---|---|",
    ]
    for r in rows:
        name = r["layer"] + (f" (chunk_size={args.chunk_size})" if r["layer"] == "dna_chunked" else "")
        if "error" in r:
            lines.append(f"| {r['length']} | {name} | failed: {r['error']} | |")
        else:
            lines.append(f"| {r['length']} | {name} | {r['peak_gib']:.2f} | {r['seconds']:.2f} |")
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
