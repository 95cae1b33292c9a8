"""What XLA reserves for one forward+backward step of each layer.

Compiles the step (`tf.function(jit_compile=True)`) of MultiHeadAttention and
of DoublyNormalizedAttention (whole score matrix) with XLA's dumps on, and
reads from each buffer assignment the preallocated temporary buffer (the
intermediates, including those of conditional branches that never run) and
the scores' share of it. Compiles only; nothing is timed, so the numbers do
not depend on the machine's load.

    python -m benchmarks.memory.xla_memory --lengths 512 2048
"""

import argparse
import os
import pathlib
import re
import tempfile

from benchmarks import harness
from benchmarks.compile.compile_time import step_parser
from benchmarks.speed.layer_step import self_attention_step

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
LAYERS = ("mha", "dna")


def parse_args(argv=None):
    return step_parser(__doc__.splitlines()[0], [512, 2048], 8192,
                       "memory/xla_memory").parse_args(argv)


def compile_step(settings, layer_name, length, causal):
    """Compiles one layer's step; run in its own process, which dumps it."""
    step, x, _ = self_attention_step(argparse.Namespace(**settings), layer_name, length, causal)
    step.experimental_get_compiler_ir(x, x)(stage="optimized_hlo")


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
        flags = f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
        done = harness.in_subprocess(compile_step, vars(args), layer_name, length, causal,
                                     backend="tensorflow", environment={"XLA_FLAGS": flags})
        if done is not None:
            raise RuntimeError(f"{layer_name} at T={length}: {done['error']}")
        return _temp_bytes(dump_dir)


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        score_bytes = 4 * batch * args.heads * length * length
        for causal in args.causal:
            temp = {name: measure(args, name, length, causal == "yes") for name in LAYERS}
            rows.append({"length": length, "batch": batch, "causal": causal == "yes",
                         "score_bytes": score_bytes, **{f"{n}_temp_bytes": temp[n] for n in LAYERS}})
    lines = ["| T | batch | causal | MHA temp MiB | DNA temp MiB | DNA/MHA | DNA - MHA, in score matrices |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mha, dna = r["mha_temp_bytes"], r["dna_temp_bytes"]
        lines.append(f"| {r['length']} | {r['batch']} | {r['causal']} | {mha / 2**20:.0f} | "
                     f"{dna / 2**20:.0f} | {dna / mha:.2f} | {(dna - mha) / r['score_bytes']:.1f} |")
    harness.write_results(args, {"rows": rows}, "\n".join(lines), argv)


if __name__ == "__main__":
    main()
