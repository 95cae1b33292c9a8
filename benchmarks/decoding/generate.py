"""Per-token and prefill cost of keras-hub's `generate`: a converted causal LM against itself.

A randomly initialized keras-hub causal LM (`--model gpt2`: GPT-2, multi-head;
`--model llama`: Llama, grouped queries and rotary embeddings) and its
conversion (`keras_dna.convert.to_doubly_normalized`, causal double
normalization, same weights) generate greedily through keras-hub's cache,
each backend as keras-hub runs it there (TensorFlow: the loop in one
`tf.function`, XLA only where Keras turns `jit_compile` on, which it does not
on a CPU-only machine; JAX: compiled; PyTorch: eager). `generate` first runs
the whole padded prompt through the cache (the prefill), then decodes from
the shortest prompt on. Timing it with `--new-tokens A B` new tokens over
the same padded length, the difference of the two times over `B - A` tokens
is the cost of one token; the time for `A` tokens less `A` tokens' cost is
the prefill's. Each backend in its own process; in it, the two models'
calls interleaved, median over repeats; reported as DNA / softmax. Where
keras-hub computes softmax attention with a fused kernel (JAX and PyTorch
for Llama), DNA runs keras-hub's other path (einsum, softmax, einsum): the
"softmax path" columns time the model converted with
`normalization="single"`, which takes that path, to tell what the path costs
from what DNA's normalization costs.

    python -m benchmarks.decoding.generate --lengths 128 512 1024
    python -m benchmarks.decoding.generate --model llama --backends tensorflow jax torch \
        --output benchmarks/results/decoding/generate_llama
"""

import json
import os

from benchmarks import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "decoding/generate")
    p.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--backends", nargs="+", default=["tensorflow"],
                   choices=["tensorflow", "jax", "torch"])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024],
                   help="padded sequence lengths (the cache's length)")
    p.add_argument("--new-tokens", type=int, nargs=2, default=[16, 48])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--key-value-heads", type=int, default=2, help="Llama only")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def _causal_lm(settings, length):
    import keras_hub

    width = settings["heads"] * settings["head_dim"]
    shared = dict(vocabulary_size=1000, num_layers=settings["layers"], hidden_dim=width,
                  intermediate_dim=4 * width)
    if settings["model"] == "gpt2":
        backbone = keras_hub.models.GPT2Backbone(
            **shared, num_heads=settings["heads"], max_sequence_length=length
        )
        return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    backbone = keras_hub.models.LlamaBackbone(
        **shared, num_query_heads=settings["heads"],
        num_key_value_heads=settings["key_value_heads"],
    )
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def _prompts(batch, length, new_tokens):
    import numpy as np

    ids = np.random.default_rng(0).integers(1, 1000, size=(batch, length))
    mask = np.zeros((batch, length), bool)
    mask[:, : length - new_tokens] = True
    return {"token_ids": np.where(mask, ids, 0).astype("int32"), "padding_mask": mask}


def measure(settings, length):
    """One length on this process's backend (called in a fresh process)."""
    import keras

    from keras_dna import convert

    keras.utils.set_random_seed(0)
    softmax = _causal_lm(settings, length)
    models = {
        "softmax": softmax,
        "softmax_path": convert.to_doubly_normalized(softmax, normalization="single"),
        "dna": convert.to_doubly_normalized(softmax),
    }
    for model in models.values():
        model.compile(sampler="greedy")
    fewer, more = settings["new_tokens"]
    prompts = {n: _prompts(settings["batch"], length, n) for n in (fewer, more)}
    steps = {(name, n): lambda model=model, n=n: model.generate(prompts[n], stop_token_ids=None)
             for name, model in models.items() for n in (fewer, more)}
    timing = harness.time_interleaved(steps, settings["repeats"], warmup=1)
    median = {key: t["median_s"] for key, t in timing["steps"].items()}
    per_token = {name: (median[name, more] - median[name, fewer]) / (more - fewer)
                 for name in models}
    prefill = {name: median[name, fewer] - fewer * per_token[name] for name in models}
    backend = keras.backend.backend()
    compiled = {"tensorflow": "XLA" if softmax.jit_compile else "graph", "jax": "XLA",
                "torch": "eager"}[backend]
    return {
        "backend": backend,
        "mode": compiled,
        "length": length,
        **{f"{name}_ms_per_token": 1e3 * per_token[name] for name in models},
        **{f"{name}_prefill_s": prefill[name] for name in models},
        "token_ratio": per_token["dna"] / per_token["softmax"],
        "token_ratio_same_path": per_token["dna"] / per_token["softmax_path"],
        "prefill_ratio": prefill["dna"] / prefill["softmax"],
    }


def main(argv=None):
    args = parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    rows = []
    for backend in args.backends:
        for length in args.lengths:
            row = harness.in_subprocess(measure, settings, length, backend=backend)
            if "error" in row:
                raise RuntimeError(f"{backend}, length {length}: {row['error']}")
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    fewer, more = args.new_tokens
    heads = (f"{args.heads} query heads and {args.key_value_heads} key/value heads"
             if args.model == "llama" else f"{args.heads} heads")
    table = harness.markdown_table(
        f"keras-hub {args.model} `generate`, greedy, float32: {args.layers} layers of {heads} "
        f"of {args.head_dim}, batch {args.batch}; per token from {fewer} and {more} new "
        f"tokens, median of {args.repeats}",
        ["backend", "length", "softmax ms/token", "softmax path ms/token", "DNA ms/token",
         "DNA / softmax per token", "DNA / softmax path per token", "softmax prefill (s)",
         "DNA prefill (s)", "DNA / softmax prefill"],
        [
            [f"{r['backend']} ({r['mode']})", str(r["length"]), f"{r['softmax_ms_per_token']:.2f}",
             f"{r['softmax_path_ms_per_token']:.2f}", f"{r['dna_ms_per_token']:.2f}",
             f"{r['token_ratio']:.2f}x", f"{r['token_ratio_same_path']:.2f}x",
             f"{r['softmax_prefill_s']:.3f}", f"{r['dna_prefill_s']:.3f}",
             f"{r['prefill_ratio']:.2f}x"]
            for r in rows
        ],
    )
    harness.write_results(args, {"rows": rows}, table, argv)


if __name__ == "__main__":
    main()
