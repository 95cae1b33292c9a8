"""Where an XLA-compiled attention step spends its time, fusion by fusion.

Runs one layer's compiled step (`--step forward`, `forward_backward`, or
`decode`: one cached token against a cache of length T) under TensorFlow's
profiler with XLA's per-thunk trace events
(`--xla_cpu_enable_xprof_traceme`), and prints the milliseconds per step
of each kind of fusion, dot and copy, largest first, for MultiHeadAttention (or
keras-hub's `CachedMultiHeadAttention`) and DNA, so that the two HLO
programs can be compared where they spend time. Events on the two threads
of this CPU's pool overlap, so the sum exceeds the step's wall time.

    python -m benchmarks.studies.fusion_profile --step forward --length 512 --causal
    python -m benchmarks.studies.fusion_profile --step forward_backward --length 512 --outer graph
    python -m benchmarks.studies.fusion_profile --step decode --length 4096
"""

import argparse
import collections
import glob
import os
import re
import tempfile

from benchmarks import harness
from benchmarks.speed.layer_step import self_attention_step

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# What the runtime records around the fusions, not XLA's own work.
_RUNTIME_EVENTS = (
    "Execute", "Eager", "TFE_", "BlockUntilReady", "ThreadPool", "Threadpool",
    "__inference", "Memory", "ValidateInput", "end: ", "ParallelFor",
)


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "studies/fusion_profile")
    p.add_argument("--step", choices=["forward", "forward_backward", "decode"], default="forward")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (not decode)")
    p.add_argument("--batch", type=int, default=4, help="decode only")
    p.add_argument("--causal", action="store_true", help="causal mask and normalization")
    p.add_argument("--outer", choices=["xla", "graph"], default="xla",
                   help="compile the whole step, or run it as a TensorFlow graph (TensorFlow's "
                   "ops then show by type, DNA's compiled normalization by fusion)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    return p.parse_args(argv)


def _layer_steps(args, name):
    settings = argparse.Namespace(tokens=args.tokens, width=512, heads=8)
    step, x, _ = self_attention_step(settings, name, args.length, args.causal, args.step,
                                     mode=args.outer)
    return lambda: step(x, x)


def _decode_step(args, name):
    import keras_hub
    import numpy as np
    import tensorflow as tf

    from keras_dna.hub import CachedDoublyNormalizedAttention

    if name == "mha":
        layer, width = keras_hub.layers.CachedMultiHeadAttention(8, 64), 64
    else:
        layer, width = CachedDoublyNormalizedAttention(8, 64, causal_normalization=True), 65
    rng = np.random.default_rng(0)
    cache = rng.normal(size=(args.batch, 2, args.length, 8, width))
    cache[:, 0, ..., 64:] = 0.0  # the key state: every key seen
    cache = tf.constant(cache, "float32")
    token = tf.constant(rng.normal(size=(args.batch, 1, 512)), "float32")
    layer(token, token)
    mask = tf.ones((1, 1, args.length), "bool")

    @tf.function(jit_compile=True)
    def step(token, cache):
        return layer(token, token, attention_mask=mask, cache=cache,
                     cache_update_index=args.length - 1)

    return lambda: step(token, cache)


def profile(args, name):
    """`{event name: ms per step}` of one layer's step."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    step = harness.blocking((_decode_step if args.step == "decode" else _layer_steps)(args, name))
    for _ in range(3):
        step()
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(args.repeats):
            step()
        tf.profiler.experimental.stop()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    total = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                total[names.get(event.metadata_id, "?")] += event.duration_ps / 1e9
    # The step's own Python function, `forward` or `step`, is not XLA's.
    return {
        event: ms / args.repeats for event, ms in total.items()
        if event not in ("forward", "forward_backward", "step")
        and not any(part in event for part in _RUNTIME_EVENTS)
        and event.split(":")[-1] not in ("Process", "Run", "Start")
    }


def grouped(times):
    """`{kind: (ms, count)}`: events of one kind (`slice_add_fusion.3`,
    `slice_add_fusion.7`, ...) summed."""
    groups = collections.defaultdict(lambda: [0.0, 0])
    for event, ms in times.items():
        # TensorFlow's ops by type: "gradients/.../Einsum:_MklEinsum".
        group = groups[re.sub(r"\.\d+$", "", event.split(":")[-1])]
        group[0] += ms
        group[1] += 1
    return {kind: tuple(value) for kind, value in groups.items()}


def main(argv=None):
    args = parse_args(argv)
    what = f"{args.step}, length {args.length}" + (", causal" if args.causal else "")
    if args.step != "decode":
        what += f", {args.outer}"
    tables, profiles = [], {}
    for name in ("mha", "dna"):
        profiles[name] = times = profile(args, name)
        kinds = sorted(grouped(times).items(), key=lambda item: -item[1][0])[: args.top]
        tables.append(harness.markdown_table(
            f"{name.upper()} ({what}): {sum(times.values()):.1f} ms per step over {len(times)} events",
            ["ms per step", "kind", "events"], [[f"{ms:.2f}", kind, str(count)] for kind, (ms, count) in kinds]))
    harness.write_results(args, {"events_ms": profiles}, "\n\n".join(tables), argv)


if __name__ == "__main__":
    main()
