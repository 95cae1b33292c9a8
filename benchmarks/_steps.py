"""One layer's XLA-compiled forward+backward step, as the compile-only
benchmarks (`xla_memory.py`, `compile_time.py`) build it."""


def forward_backward_step(args, layer_name, length, causal):
    """`(step, x, batch)`: `step(x)` returns the gradients of the summed
    squared self-attention output in `x` and the layer's weights, under
    `tf.function(jit_compile=True)`, not yet traced. `layer_name`: "mha" or
    "dna" (whole score matrix); `args` gives tokens per batch, width, heads.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_dna

    batch = max(1, args.tokens // length)
    x = tf.constant(np.random.default_rng(0).normal(size=(batch, length, args.width)), "float32")
    head_dim = args.width // args.heads
    if layer_name == "mha":
        layer = keras.layers.MultiHeadAttention(args.heads, head_dim)
    else:
        layer = keras_dna.DoublyNormalizedAttention(args.heads, head_dim, chunk_size=None)
    layer(x[:, :2], x[:, :2])
    return self_attention_steps(layer, causal)["forward_backward"], x, batch


def self_attention_steps(layer, causal, jit_compile=True):
    """`{"forward", "forward_backward"}`: `tf.function`s of `x`, not yet
    traced: the layer's self-attention output, and the gradients of its
    summed square in `x` and the layer's weights."""
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile)
    def forward(x):
        return layer(x, x, use_causal_mask=causal)

    @tf.function(jit_compile=jit_compile)
    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x, x, use_causal_mask=causal)))
        return tape.gradient(loss, [x] + layer.trainable_weights)

    return {"forward": forward, "forward_backward": forward_backward}


def step_parser(description, lengths, tokens, output):
    """The options `forward_backward_step` reads, and the lengths, causal
    settings and output of a benchmark over such steps."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--lengths", type=int, nargs="+", default=lengths)
    p.add_argument("--tokens", type=int, default=tokens, help="tokens per batch (batch = tokens / length)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--causal", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    p.add_argument("--output", default=output, help="writes OUTPUT.json and OUTPUT.md")
    return p
