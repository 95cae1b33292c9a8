"""Grapheme-to-phoneme: an encoder-decoder Transformer over the CMU dictionary.

The encoder reads a word's letters with doubly-normalized self-attention; the
decoder writes its ARPAbet phonemes with causal DNA self-attention
(`use_causal_mask=True`) and DNA cross-attention with causal normalization,
so that no phoneme's attention depends on later phonemes, in training as in
generation. --attention chooses the attention of each site, e.g.
encoder=double,decoder=single,cross=double+null. Greedy decoding through the
DNA cache (`keras_dna.hub.CachedDoublyNormalizedAttention`: the encoder runs
once, the decoder one phoneme per step), or with --decoding rerun by running
the whole decoder again for every phoneme; word and phoneme error rates on
the test split. The SavedModel takes raw words and returns phoneme strings.

    python examples/grapheme_to_phoneme.py --attention double --output-dir runs/g2p
"""

import os
import pathlib
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


import common  # noqa: E402
import datasets  # noqa: E402
import transformer  # noqa: E402
from keras_dna.hub import CachedDoublyNormalizedAttention  # noqa: E402

MAX_LETTERS = 16
MAX_PHONEMES = 16  # including the start token
START, END = "<s>", "</s>"
DECODINGS = ("cached", "rerun")


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


def _cached_copy(layer):
    """A decoder's `layer` (a DoublyNormalizedAttention) as a cached layer,
    same weights. Normalization is causal: the self-attention was called
    with `use_causal_mask=True`, the cross-attention built so."""
    config = {**layer.get_config(), "causal_normalization": True}
    cached = CachedDoublyNormalizedAttention.from_config(config)
    cached.build_from_config(layer.get_build_config())
    cached.set_weights(layer.get_weights())
    return cached


class CachedDecoder(tf.Module):
    """The trained decoder, one phoneme per step, through the DNA cache.

    The encoder runs once per batch; each step runs the decoder blocks on the
    newest phoneme only, against the cached keys and values of the earlier
    phonemes (self-attention) and of the letters (cross-attention), with
    the key state that causal DNA keeps per cached key.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.encoder = keras.Model(model.inputs[0], model.get_layer("encoder_norm").output)
        self.depth = sum(layer.name.endswith("_self") for layer in model.layers)
        self.attention = {
            name: _cached_copy(model.get_layer(name))
            for block in range(self.depth)
            for name in (f"decoder{block}_self", f"decoder{block}_cross")
        }

    def start(self, letter_ids):
        """The letters' memory and each block's empty caches."""
        # Without the letters' Keras mask, which the projections below do
        # not take (the attention masks carry it).
        memory = tf.identity(self.encoder(letter_ids, training=False))
        batch = tf.shape(letter_ids)[0]
        caches = []
        for block in range(self.depth):
            self_attention = self.attention[f"decoder{block}_self"]
            cross = self.attention[f"decoder{block}_cross"]
            head_shape = [self_attention.num_heads, self_attention.key_dim]
            empty = tf.zeros([batch, 2, MAX_PHONEMES] + head_shape, memory.dtype)
            encoded = tf.stack([cross.key_dense(memory), cross.value_dense(memory)], axis=1)
            caches.append((empty, encoded))
        return memory, caches

    def step(self, phonemes, position, memory, letter_mask, caches):
        """Logits of the phoneme after `phonemes[:, position]`, new caches.

        Padding ids (0) among `phonemes` are masked as the model's Keras
        masks mask them, as queries and as keys.
        """
        layer = self.model.get_layer
        phoneme = phonemes[:, position]
        x = layer("phoneme_embedding")(phoneme[:, None])
        x = x + layer("phoneme_positions").embeddings[position]
        query_mask = (phoneme > 0)[:, None, None]
        earlier = tf.range(MAX_PHONEMES)[None, None, :] <= position
        earlier = earlier & (phonemes > 0)[:, None, :] & query_mask
        letter_mask = letter_mask[:, None, :] & query_mask
        updated = []
        for block, (self_cache, cross_cache) in enumerate(caches):
            name = f"decoder{block}"
            y = layer(f"{name}_norm1")(x)
            y, self_cache = self.attention[f"{name}_self"](
                y, y, attention_mask=earlier, cache=self_cache, cache_update_index=position
            )
            x = x + y
            y = layer(f"{name}_norm2")(x)
            y, cross_cache = self.attention[f"{name}_cross"](
                y, memory, attention_mask=letter_mask, cache=cross_cache
            )
            x = x + y
            y = layer(f"{name}_norm3")(x)
            x = x + layer(f"{name}_ffn_down")(layer(f"{name}_ffn_up")(y))
            updated.append((self_cache, cross_cache))
        logits = layer("next_phoneme")(layer("decoder_norm")(x))
        return logits[:, 0], updated


class Speller(tf.Module):
    """Raw words -> phoneme strings, in the graph: lookups and greedy decoding.

    `decoding`: "cached" (one decoder step per phoneme, `CachedDecoder`) or
    "rerun" (the whole decoder again for every phoneme).
    """

    def __init__(self, model, letter_vocabulary, phoneme_vocabulary, decoding="cached"):
        super().__init__()
        if decoding not in DECODINGS:
            raise ValueError(f"`decoding` must be one of {DECODINGS}. Received: {decoding!r}")
        self.model = model
        self.decoder = CachedDecoder(model) if decoding == "cached" else None
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
        """Greedy decoding, one phoneme per position."""
        batch = tf.shape(letter_ids)[0]
        prefix = tf.concat(
            [tf.fill([batch, 1], self.start_id), tf.zeros([batch, MAX_PHONEMES - 1], "int32")], 1
        )
        if self.decoder is not None:
            memory, caches = self.decoder.start(letter_ids)
        for position in range(MAX_PHONEMES - 1):
            if self.decoder is None:
                logits = self.model([letter_ids, prefix], training=False)[:, position]
            else:
                logits, caches = self.decoder.step(
                    prefix, position, memory, letter_ids > 0, caches
                )
            chosen = tf.cast(tf.argmax(logits, axis=-1), "int32")
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
    parser = common.parser(
        __doc__.splitlines()[0], "g2p", epochs=5, batch_size=128, learning_rate=1e-3,
        output_dir="runs/g2p"
    )
    parser.add_argument(
        "--decoding", choices=DECODINGS, default="cached",
        help="greedy decoding through the DNA cache, or rerunning the decoder per phoneme",
    )
    return parser.parse_args(argv)


def spell(speller, words, batch_size=1024):
    """Phoneme lists for `words`, and the decoding time per word in ms
    (after a warm-up call on the first batch, which traces the graph and
    compiles it for that batch size)."""
    speller.serve(tf.constant(words[:batch_size]))
    start = time.perf_counter()
    predicted = []
    for first in range(0, len(words), batch_size):
        spelled = speller.serve(tf.constant(words[first : first + batch_size])).numpy()
        predicted += [s.decode().split() for s in spelled]
    return predicted, 1e3 * (time.perf_counter() - start) / max(len(words), 1)


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
    speller = Speller(model, letter_vocabulary, phoneme_vocabulary, args.decoding)
    test_words = [pairs[i][0] for i in test]
    predicted, ms_per_word = spell(speller, test_words)
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
        decoding=args.decoding,
        decoding_ms_per_word=ms_per_word,
        examples={w: " ".join(p) for w, p in list(zip(test_words, predicted))[:10]},
        explaining_away=explaining_away,
    )
    print(
        f"test word error rate {word_error_rate:.4f}, phoneme error rate "
        f"{phoneme_error_rate:.4f}; {args.decoding} decoding {ms_per_word:.3f} ms per "
        f"word; outputs in {run.output_dir}"
    )
    return metrics


if __name__ == "__main__":
    main()
