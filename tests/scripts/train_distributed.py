"""Trains a small DNA model under a strategy spec; used by tests/test_distribute.py.

Writes the final weights (weights.npz) and, on the chief, the model
(model.keras) to --output-dir. Deterministic: fixed seed, data and order.

    python tests/scripts/train_distributed.py --strategy mirrored --logical-cpus 2 ...
"""

import argparse
import os
import pathlib
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="cpu")
    parser.add_argument("--logical-cpus", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="steps per epoch")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--dtype-policy", default="float32")
    parser.add_argument("--backup-dir", default=None)
    parser.add_argument("--pause-after-epoch", type=int, default=None,
                        help="write 'paused' and sleep after this epoch (to be killed)")
    parser.add_argument("--output-dir", required=True)
    return parser.parse_args()


def make_data(count):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 30, size=(count, 12)).astype("int32")
    lengths = rng.integers(4, 13, size=count)
    tokens[np.arange(12)[None, :] >= lengths[:, None]] = 0
    labels = (tokens[:, 0] % 3).astype("int32")
    return tokens, labels


def build_model(keras, keras_dna):
    tokens = keras.Input((12,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(30, 16, mask_zero=True)(tokens)
    x = keras_dna.DoublyNormalizedAttention(2, 8, normalization="hybrid")(x, x)
    y = keras_dna.DoublyNormalizedAttention(2, 8)(x, x, use_causal_mask=True)
    x = keras.layers.GlobalAveragePooling1D()(x + y)
    logits = keras.layers.Dense(3, dtype="float32")(x)
    return keras.Model(tokens, logits)


def main():
    args = parse_args()
    if args.logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus
        )
    tf.config.experimental.enable_op_determinism()

    import keras

    import keras_dna

    keras.mixed_precision.set_global_policy(args.dtype_policy)
    strategy = keras_dna.distribute.strategy_from_spec(args.strategy)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(keras, keras_dna)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    tokens, labels = make_data(args.steps * args.global_batch)
    dataset = tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(
        args.global_batch, drop_remainder=True
    )
    options = tf.data.Options()
    # Every worker sees the whole global batch; the strategy splits it.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)

    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    callbacks = []
    if args.backup_dir:
        callbacks.append(keras.callbacks.BackupAndRestore(args.backup_dir))
    if args.pause_after_epoch is not None:
        class Pause(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 == args.pause_after_epoch:
                    (output_dir / "paused").write_text(str(epoch + 1))
                    signal.pause()  # wait here to be killed
        callbacks.append(Pause())
    history = model.fit(dataset, epochs=args.epochs, callbacks=callbacks, verbose=0)
    losses = np.array(history.history["loss"])
    is_chief = keras_dna.distribute.is_chief(strategy)
    np.savez(
        output_dir / f"weights_{'chief' if is_chief else 'worker'}.npz",
        *[np.asarray(w, np.float32) for w in model.get_weights()],
        losses=losses,
        replicas=strategy.num_replicas_in_sync,
    )
    if is_chief:
        model.save(output_dir / "model.keras")
    print("done", losses.tolist(), flush=True)


if __name__ == "__main__":
    main()
