"""Grapheme-to-phoneme: an encoder-decoder Transformer over the CMU dictionary.

The encoder reads a word's letters with doubly-normalized self-attention; the
decoder writes its ARPAbet phonemes with causal DNA self-attention
(`use_causal_mask=True`) and DNA cross-attention with causal normalization,
so that no phoneme's attention depends on later phonemes, in training as in
generation. --attention chooses the attention of each site, e.g.
encoder=double,decoder=single,cross=double+null. Greedy decoding; word and
phoneme error rates on the test split. The SavedModel takes raw words and
returns phoneme strings.

    python examples/grapheme_to_phoneme.py --attention double --output-dir runs/g2p
"""

import os
import pathlib
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


import common  # noqa: E402
import datasets  # noqa: E402
import transformer  # noqa: E402

MAX_LETTERS = 16
MAX_PHONEMES = 16  # including the start token
START, END = "<s>", "</s>"


def load_pairs(limit):
    pairs = [
        (word, phonemes)
        for word, phonemes in datasets.cmu_pronunciations()
        if re.fullmatch(r"[a-z']+", word)
        and len(word) <= MAX_LETTERS
        and len(phonemes) <= MAX_PHONEMES - 1
    ]
    return [pairs[i] for i in datasets.subset(len(pairs), limit)]


def decoder_block(x, memory, attention, heads, dropout, name):
    """`attention`: a `common.AttentionSpec` with the decoder and cross sites."""
    width = x.shape[-1]
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm1")(x)
    y = transformer.attention_layer(
        attention.layer_kwargs("decoder"), width, heads, dropout, f"{name}_self"
    )(y, y, use_causal_mask=True)
    x = keras.layers.Add()([x, keras.layers.Dropout(dropout)(y)])
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm2")(x)
    # The keys are the encoder's, but the queries are generated one by one
    # (softmax normalizes per query and ignores the flag).
    y = transformer.attention_layer(
        attention.layer_kwargs("cross"), width, heads, dropout, f"{name}_cross",
        causal_normalization=True,
    )(y, memory)
    x = keras.layers.Add()([x, keras.layers.Dropout(dropout)(y)])
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm3")(x)
    return keras.layers.Add()([x, transformer.feed_forward(y, width, dropout, f"{name}_ffn")])


def build_model(attention, letters, phonemes, width=64, heads=4, depth=2, dropout=0.1):
    """`attention`: a `common.AttentionSpec` or its string form, e.g.
    "double" or "encoder=double,decoder=single,cross=hybrid"."""
    attention = common.AttentionSpec.of(attention, common.EXAMPLE_SITES["g2p"])
    letter_ids = keras.Input((MAX_LETTERS,), dtype="int32", name="letters")
    phoneme_ids = keras.Input((MAX_PHONEMES,), dtype="int32", name="phonemes")
    x = keras.layers.Embedding(letters, width, mask_zero=True, name="letter_embedding")(letter_ids)
    x = transformer.PositionEmbedding(MAX_LETTERS, name="letter_positions")(x)
    encoder = attention.layer_kwargs("encoder")
    for block in range(depth):
        x = transformer.encoder_block(x, encoder, heads, dropout, f"encoder{block}")
    memory = keras.layers.LayerNormalization(epsilon=1e-6, name="encoder_norm")(x)
    y = keras.layers.Embedding(phonemes, width, mask_zero=True, name="phoneme_embedding")(phoneme_ids)
    y = transformer.PositionEmbedding(MAX_PHONEMES, name="phoneme_positions")(y)
    for block in range(depth):
        y = decoder_block(y, memory, attention, heads, dropout, f"decoder{block}")
    y = keras.layers.LayerNormalization(epsilon=1e-6, name="decoder_norm")(y)
    logits = keras.layers.Dense(phonemes, name="next_phoneme")(y)
    return keras.Model([letter_ids, phoneme_ids], logits, name="g2p")


class Speller(tf.Module):
    """Raw words -> phoneme strings, in the graph: lookups and greedy decoding."""

    def __init__(self, model, letter_vocabulary, phoneme_vocabulary):
        super().__init__()
        self.model = model
        # Index 0 is the padding id; StringLookup keeps 1 for unknown letters.
        self.letters = keras.layers.StringLookup(vocabulary=letter_vocabulary, mask_token="")
        self.phoneme_names = keras.layers.StringLookup(
            vocabulary=phoneme_vocabulary, mask_token="", invert=True
        )
        self.start_id = phoneme_vocabulary.index(START) + 2
        self.end_id = phoneme_vocabulary.index(END) + 2

    def encode_words(self, words):
        letters = tf.strings.unicode_split(tf.strings.lower(words), "UTF-8")[:, :MAX_LETTERS]
        ids = self.letters(letters).to_tensor(default_value=0, shape=[None, MAX_LETTERS])
        return tf.cast(ids, "int32")

    def decode_ids(self, letter_ids):
        """Greedy decoding: one decoder pass per output position."""
        batch = tf.shape(letter_ids)[0]
        prefix = tf.concat(
            [tf.fill([batch, 1], self.start_id), tf.zeros([batch, MAX_PHONEMES - 1], "int32")], 1
        )
        for position in range(MAX_PHONEMES - 1):
            logits = self.model([letter_ids, prefix], training=False)
            chosen = tf.cast(tf.argmax(logits[:, position], axis=-1), "int32")
            # Once a word has ended, keep writing padding.
            ended = tf.reduce_any(tf.equal(prefix[:, 1 : position + 1], self.end_id), axis=1)
            chosen = tf.where(ended, 0, chosen)
            column = tf.one_hot(position + 1, MAX_PHONEMES, on_value=1, off_value=0, dtype="int32")
            prefix = prefix + chosen[:, None] * column[None, :]
        return prefix[:, 1:]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(self, words):
        ids = self.decode_ids(self.encode_words(words))
        kept = tf.logical_and(ids > 0, ids != self.end_id)
        names = tf.ragged.boolean_mask(self.phoneme_names(ids), kept)
        return tf.strings.reduce_join(names, axis=1, separator=" ")


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def plot_labels(sample, letter_vocabulary, phoneme_vocabulary, depth=2):
    """The first example's letters (encoder queries, all keys but the
    decoder's own) and phonemes (decoder queries and self-attention keys)."""
    letter_ids, phoneme_ids = sample
    # Id 0 (padding) is left out of the plot; 1 is the unknown letter.
    letters = ["", "?", *letter_vocabulary]
    phonemes = ["", "?", *phoneme_vocabulary]
    word = [letters[i] for i in letter_ids[0]]
    spoken = [phonemes[i] for i in phoneme_ids[0]]
    query_labels, key_labels = {}, {}
    for block in range(depth):
        query_labels[f"encoder{block}_attention"] = key_labels[f"encoder{block}_attention"] = word
        query_labels[f"decoder{block}_self"] = key_labels[f"decoder{block}_self"] = spoken
        query_labels[f"decoder{block}_cross"], key_labels[f"decoder{block}_cross"] = spoken, word
    return {"query_labels": query_labels, "key_labels": key_labels}


def parse_args(argv=None):
    return common.parser(
        __doc__.splitlines()[0], "g2p", epochs=5, batch_size=128, learning_rate=1e-3,
        output_dir="runs/g2p"
    ).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = common.Run(args)
    pairs = load_pairs(args.limit)
    letter_vocabulary = sorted({c for word, _ in pairs for c in word})
    phoneme_vocabulary = sorted({p for _, ps in pairs for p in ps}) + [START, END]
    # Ids: 0 padding, 1 unknown (StringLookup's layout), then the vocabulary.
    letter_index = {c: i + 2 for i, c in enumerate(letter_vocabulary)}
    phoneme_index = {p: i + 2 for i, p in enumerate(phoneme_vocabulary)}
    letters = np.zeros((len(pairs), MAX_LETTERS), "int32")
    targets = np.zeros((len(pairs), MAX_PHONEMES + 1), "int32")
    for n, (word, phonemes) in enumerate(pairs):
        letters[n, : len(word)] = [letter_index[c] for c in word]
        sequence = [START] + phonemes + [END]
        targets[n, : len(sequence)] = [phoneme_index[p] for p in sequence]
    train, validation, test = datasets.split_indices(len(pairs), seed=0)

    def batches(indices, shuffle):
        inputs = (letters[indices], targets[indices, :-1])
        return common.batches(inputs, targets[indices, 1:], args.batch_size, shuffle, args.seed)

    model, history = common.compile_and_fit(
        run,
        lambda: build_model(args.attention, len(letter_vocabulary) + 2, len(phoneme_vocabulary) + 2),
        batches(train, shuffle=True), batches(validation, shuffle=False),
    )
    speller = Speller(model, letter_vocabulary, phoneme_vocabulary)
    test_words = [pairs[i][0] for i in test]
    predicted = []
    for start in range(0, len(test_words), 1024):
        spelled = speller.serve(tf.constant(test_words[start : start + 1024])).numpy()
        predicted += [s.decode().split() for s in spelled]
    references = [pairs[i][1] for i in test]
    errors = [edit_distance(p, r) for p, r in zip(predicted, references)]
    word_error_rate = float(np.mean([e > 0 for e in errors]))
    phoneme_error_rate = float(sum(errors) / sum(len(r) for r in references))
    sample = (letters[test[:256]], targets[test[:256], :-1])
    explaining_away = run.analyse_attention(
        model, sample, layers=("encoder0_attention", "decoder0_self", "decoder0_cross"),
        **plot_labels(sample, letter_vocabulary, phoneme_vocabulary),
    )
    if run.is_chief:
        tf.saved_model.save(speller, str(run.output_dir / "saved_model"))
    metrics = run.write_metrics(
        "g2p",
        history,
        test_word_error_rate=word_error_rate,
        test_phoneme_error_rate=phoneme_error_rate,
        examples={w: " ".join(p) for w, p in list(zip(test_words, predicted))[:10]},
        explaining_away=explaining_away,
    )
    print(
        f"test word error rate {word_error_rate:.4f}, phoneme error rate "
        f"{phoneme_error_rate:.4f}; outputs in {run.output_dir}"
    )
    return metrics


if __name__ == "__main__":
    main()
