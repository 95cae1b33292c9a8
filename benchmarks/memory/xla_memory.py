"""What XLA reserves for one forward+backward step of each layer.

Compiles the step (`tf.function(jit_compile=True)`) of MultiHeadAttention and
of DoublyNormalizedAttention (whole score matrix) with XLA's dumps on, and
reads from each buffer assignment the preallocated temporary buffer (the
intermediates, including those of conditional branches that never run) and
the scores' share of it. Compiles only; nothing is timed, so the numbers do
not depend on the machine's load.

    python benchmarks/xla_memory.py --lengths 512 2048 --output benchmarks/results/xla_memory
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from _results import write_results
from _steps import forward_backward_step
from _steps import step_parser

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
LAYERS = ("mha", "dna")


def parse_args(argv=None):
    p = step_parser(__doc__.splitlines()[0], lengths=[512, 2048], tokens=8192, output="benchmarks/results/xla_memory")
    # Internal: compile one layer's step in this process.
    p.add_argument("--compile", nargs=3, metavar=("LAYER", "LENGTH", "CAUSAL"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def compile_step(args, layer_name, length, causal):
    forward_backward, x, batch = forward_backward_step(args, layer_name, length, causal)

    forward_backward.experimental_get_compiler_ir(x)(stage="optimized_hlo")
    return batch


def _temp_bytes(dump_dir):
    """The preallocated temp buffer of the step's executable (the largest module)."""
    sizes = []
    for path in pathlib.Path(dump_dir).glob("*forward_backward*buffer-assignment.txt"):
        match = re.search(r"allocation \d+: size (\d+), preallocated-temp", path.read_text())
        if match:
            sizes.append(int(match.group(1)))
    if not sizes:
        raise RuntimeError(f"no buffer assignment with a preallocated temp in {dump_dir}")
    return max(sizes)


def measure(args, layer_name, length, causal):
    with tempfile.TemporaryDirectory() as dump_dir:
        env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text")
        command = [sys.executable, __file__, "--compile", layer_name, str(length), causal,
                   "--tokens", str(args.tokens), "--width", str(args.width), "--heads", str(args.heads)]
        subprocess.run(command, check=True, env=env, capture_output=True)
        return _temp_bytes(dump_dir)


def main(argv=None):
    args = parse_args(argv)
    if args.compile:
        layer_name, length, causal = args.compile
        compile_step(args, layer_name, int(length), causal == "yes")
        return
    rows = []
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        score_bytes = 4 * batch * args.heads * length * length
        for causal in args.causal:
            temp = {name: measure(args, name, length, causal) for name in LAYERS}
            rows.append({"length": length, "batch": batch, "causal": causal == "yes",
                         "score_bytes": score_bytes, **{f"{n}_temp_bytes": temp[n] for n in LAYERS}})
    lines = ["| T | batch | causal | MHA temp MiB | DNA temp MiB | DNA/MHA | DNA - MHA, in score matrices |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mha, dna = r["mha_temp_bytes"], r["dna_temp_bytes"]
        lines.append(f"| {r['length']} | {r['batch']} | {r['causal']} | {mha / 2**20:.0f} | "
                     f"{dna / 2**20:.0f} | {dna / mha:.2f} | {(dna - mha) / r['score_bytes']:.1f} |")
    write_results(args.output, "xla_memory.py", argv, {"settings": vars(args), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
