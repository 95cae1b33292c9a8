"""Per-token cost of keras-hub's `generate`: a GPT-2 converted to DNA against itself.

A randomly initialized `keras_hub.models.GPT2CausalLM` and its conversion
(`keras_dna.convert.to_doubly_normalized`, causal double normalization,
same weights) generate greedily as `generate` runs on TensorFlow: the
whole decoding loop in one `tf.function`, each layer's cache carried from
step to step, compiled with XLA only where Keras turns `jit_compile` on
(not on a CPU-only machine, where the table says "graph"). `generate` first runs the
whole padded sequence through the cache, then decodes from the shortest
prompt on; timing it with `--new-tokens A B` new tokens over the same
padded length, the difference of the two times over `B - A` tokens is the
cost of one token, without the prefill. Same process, the two models'
calls interleaved, median over repeats; reported as DNA / MHA per length.

    python -m benchmarks.decoding.generate --lengths 256 1024
"""

import json
import os

from benchmarks import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "decoding/generate")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024],
                   help="padded sequence lengths (the cache's length)")
    p.add_argument("--new-tokens", type=int, nargs=2, default=[16, 48])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def _models(args, length):
    import keras
    import keras_hub

    from keras_dna import convert

    keras.utils.set_random_seed(0)
    width = args.heads * args.head_dim
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=1000, num_layers=args.layers, num_heads=args.heads,
        hidden_dim=width, intermediate_dim=4 * width, max_sequence_length=length,
    )
    mha = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    dna = convert.to_doubly_normalized(mha)
    for model in (mha, dna):
        model.compile(sampler="greedy")
    return {"mha": mha, "dna": dna}, "XLA" if mha.jit_compile else "graph"


def _prompts(args, length, new_tokens):
    import numpy as np

    ids = np.random.default_rng(0).integers(1, 1000, size=(args.batch, length))
    mask = np.zeros((args.batch, length), bool)
    mask[:, : length - new_tokens] = True
    return {"token_ids": np.where(mask, ids, 0).astype("int32"), "padding_mask": mask}


def measure(args, length):
    models, mode = _models(args, length)
    prompts = {n: _prompts(args, length, n) for n in args.new_tokens}
    steps = {(name, n): lambda model=model, n=n: model.generate(prompts[n], stop_token_ids=None)
             for name, model in models.items() for n in args.new_tokens}
    timing = harness.time_interleaved(steps, args.repeats, warmup=1)
    fewer, more = args.new_tokens
    median = {key: t["median_s"] for key, t in timing["steps"].items()}
    per_token = {
        name: (median[name, more] - median[name, fewer]) / (more - fewer) for name in models
    }
    return {
        "length": length,
        "mode": mode,
        "mha_ms_per_token": 1e3 * per_token["mha"],
        "dna_ms_per_token": 1e3 * per_token["dna"],
        "ratio": per_token["dna"] / per_token["mha"],
        "mha_s_whole": median["mha", more],
        "dna_s_whole": median["dna", more],
    }


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for length in args.lengths:
        rows.append(measure(args, length))
        print(json.dumps(rows[-1]), flush=True)
    fewer, more = args.new_tokens
    table = harness.markdown_table(
        f"keras-hub GPT-2 `generate`, greedy, {rows[0]['mode']}, float32: {args.layers} layers "
        f"of {args.heads} heads of {args.head_dim}, batch {args.batch}; per token from "
        f"{fewer} and {more} new tokens, median of {args.repeats}",
        ["length", "MHA ms/token", "DNA ms/token", "DNA / MHA", f"MHA s ({more} tokens)",
         f"DNA s ({more} tokens)"],
        [
            [str(r["length"]), f"{r['mha_ms_per_token']:.2f}", f"{r['dna_ms_per_token']:.2f}",
             f"{r['ratio']:.2f}x", f"{r['mha_s_whole']:.2f}", f"{r['dna_s_whole']:.2f}"]
            for r in rows
        ],
    )
    harness.write_results(args, {"rows": rows}, table, argv)


if __name__ == "__main__":
    main()
