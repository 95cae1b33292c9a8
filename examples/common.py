"""Command line, strategy and metrics shared by the examples."""

import argparse
import json
import pathlib
import time

import keras_dna


def parser(description, epochs, batch_size, output_dir):
    """The arguments every example takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--attention", choices=keras_dna.ops.NORMALIZATIONS, default="double",
                   help="single (softmax), double (DNA) or hybrid")
    p.add_argument("--strategy", choices=keras_dna.distribute.SPECS, default="auto",
                   help="distribution strategy (see keras_dna.distribute)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size, help="global batch size")
    p.add_argument("--seed", type=int, default=0, help="initialization and shuffling seed")
    p.add_argument("--limit", type=int, default=None,
                   help="use only this many examples (for quick runs)")
    p.add_argument("--output-dir", default=output_dir)
    return p


def batches(features, targets, batch_size, shuffle, seed, transform=None):
    """A tf.data pipeline; training batches are whole (static shapes, as TPUs require)."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((features, targets))
    if shuffle:
        data = data.shuffle(len(targets), seed=seed)
    data = data.batch(batch_size, drop_remainder=shuffle)
    if transform is not None:
        data = data.map(transform)
    return data.prefetch(tf.data.AUTOTUNE)


def compile_and_fit(run, build, learning_rate, train_data, validation_data,
                    loss=None, metrics=("accuracy",)):
    """Builds the model in the strategy's scope and trains it with `fit`;
    the loss defaults to cross-entropy of logits."""
    import keras

    with run.strategy.scope():
        model = build()
        model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=1e-4),
            # Keras masks (padding) leave padded positions out of the loss.
            loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=list(metrics),
        )
    history = model.fit(train_data, validation_data=validation_data, epochs=run.args.epochs)
    return model, history


class Run:
    """The strategy, output folder and timing of one example run."""

    def __init__(self, args):
        import keras

        keras.utils.set_random_seed(args.seed)
        self.args = args
        self.strategy = keras_dna.distribute.strategy_from_spec(args.strategy)
        self.is_chief = keras_dna.distribute.is_chief(self.strategy)
        self.output_dir = pathlib.Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.start = time.time()

    def analyse_attention(self, model, inputs, **plot_options):
        """Explaining-away statistics of `model` on `inputs`; on the chief,
        also attention.png and the column sums (column_sums.npz).

        `plot_options` go to `keras_dna.analysis.plot_attention`: the
        plotted example's `query_labels` and `key_labels`, `layers`.
        """
        report = keras_dna.analysis.collect_attention(model, inputs)
        return self.save_attention(model.name, report, **plot_options)

    def save_attention(self, model_name, report, **plot_options):
        """`analyse_attention` for a report already collected."""
        import numpy as np

        if self.is_chief:
            keras_dna.analysis.plot_attention(
                {model_name: report}, self.output_dir / "attention.png", **plot_options
            )
            np.savez(
                self.output_dir / "column_sums.npz",
                **{layer.name: layer.valid_column_sums for layer in report},
            )
        return keras_dna.analysis.explaining_away_statistics(report)

    def write_metrics(self, example, history, **metrics):
        """Writes metrics.json (chief only) and returns the metrics."""
        args = self.args
        record = {
            "example": example,
            "attention": args.attention,
            "seed": args.seed,
            "epochs": args.epochs,
            "strategy": args.strategy,
            "replicas": self.strategy.num_replicas_in_sync,
            "seconds": round(time.time() - self.start, 1),
            **metrics,
            "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        }
        if self.is_chief:
            (self.output_dir / "metrics.json").write_text(json.dumps(record, indent=2))
        return record
