"""A diagnostic of explaining away: finding the centres of point clusters.

Each example is a set of POINTS points in the plane drawn around CLUSTERS
centres, with unequal cluster sizes (one can hold most points, another only
two). CLUSTERS learned "slot" queries read the points through two
cross-attention layers (`keras_dna.DoublyNormalizedAttention`; the points are
the keys and values) and each slot outputs a centre; the loss matches the
slots to the true centres in the best order. A cluster is found when its
matched slot lands within RADIUS of its centre.

    python examples/explaining_away.py --attention single --seed 0 --output-dir runs/explaining_away

Why it isolates explaining away. The answer needs every cluster, so the
points of every cluster, small ones included, must reach some slot: the
information is spread over keys that not every query favours. With softmax
each slot weighs the points by its own scores alone, so nothing stops two
slots from settling on the same (large) cluster while no slot reads a small
one: its points are starved, and its centre cannot be found. Doubly-normalized
attention first divides each point's unit of attention among the slots (the
E-step of a mixture model, as in k-means or Slot Attention), so every point
reaches some slot (total attention >= 1/POINTS, docs/math.md, property 2) and
slots compete for points. The model is tiny, has no positions (a point set),
and only the attention's normalization changes between runs. metrics.json puts
the task metric beside the explaining-away statistics of the same test
examples, including the recall of clusters whose points were starved (mean
attention below DNA's bound in every layer) and of the others, so one sees
whether starved keys go together with errors.

What it does not show. The task is built so that an assignment (each point
to one slot) is the right computation, which is what double normalization
does in one step; it says nothing about tasks where it is not, such as the
examples' text, digits and g2p, where DNA did not improve accuracy. The
guarantee is that every key is read, not that it is read by the right
query: a cluster can be spread thinly over all slots and still be missed.
With several heads (--heads, default 4) a point one head starves may be read
by another, so the share of key-head pairs below the bound overstates what
is lost; the per-cluster count averages the heads. Starved clusters and
missed clusters going together is a correlation on this task, not proof
that starvation causes the errors; a softmax model with more slots, heads or
layers may find every cluster without competition.
"""

import itertools
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
import datasets  # noqa: E402
import transformer  # noqa: E402

import keras_dna  # noqa: E402

POINTS = 24
CLUSTERS = 3
SPREAD = 0.1  # standard deviation of the points around their centre
SEPARATION = 0.6  # least distance between two centres
RADIUS = 2 * SPREAD  # a cluster is found when its slot is this close
EXAMPLES = 10_000
ANALYSED = 512  # test examples whose attention is recorded
ORDERS = np.array(list(itertools.permutations(range(CLUSTERS))), "int32")


def point_sets(count, seed=0):
    """`count` point sets: points (count, POINTS, 2), the cluster of each
    point (count, POINTS) and the centres (count, CLUSTERS, 2).

    Points come grouped by cluster, which helps reading the attention plot
    and tells the model nothing: it has no positions.
    """
    rng = np.random.default_rng(seed)
    points = np.zeros((count, POINTS, 2), "float32")
    members = np.zeros((count, POINTS), "int32")
    centres = np.zeros((count, CLUSTERS, 2), "float32")
    for n in range(count):
        centres[n] = _separated_centres(rng)
        # At least two points each, the rest shared out unevenly.
        sizes = 2 + rng.multinomial(POINTS - 2 * CLUSTERS, rng.dirichlet(np.ones(CLUSTERS)))
        members[n] = np.repeat(np.arange(CLUSTERS), sizes)
        points[n] = centres[n, members[n]] + rng.normal(0, SPREAD, (POINTS, 2))
    return points, members, centres


def _separated_centres(rng):
    while True:
        centres = rng.uniform(-1, 1, (CLUSTERS, 2))
        gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        if gaps[np.triu_indices(CLUSTERS, 1)].min() >= SEPARATION:
            return centres


class Slots(keras.layers.Layer):
    """CLUSTERS learned query vectors, the same for every example."""

    def __init__(self, count, width, **kwargs):
        super().__init__(**kwargs)
        self.count, self.width = count, width

    def build(self, input_shape):
        self.slots = self.add_weight(
            name="slots", shape=(self.count, self.width),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
        )

    def call(self, inputs):
        batch = keras.ops.shape(inputs)[0]
        return keras.ops.broadcast_to(self.slots[None], (batch, self.count, self.width))


def build_model(attention, width=64, heads=4, depth=2):
    """`attention`: a spec (or its string) over the site `cross`, the slots reading the points."""
    attention = common.AttentionSpec.of(attention, common.EXAMPLE_SITES["explaining_away"])
    points = keras.Input((POINTS, 2), name="points")
    # A small MLP, so that scores can depend on distances, not only on
    # directions (a linear embedding would make every score linear in the point).
    x = keras.layers.Dense(width, activation="gelu", name="encode_up")(points)
    x = keras.layers.Dense(width, name="encode_down")(x)
    memory = keras.layers.LayerNormalization(epsilon=1e-6, name="memory_norm")(x)
    slots = Slots(CLUSTERS, width, name="slots")(points)
    for block in range(depth):
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"read{block}_norm")(slots)
        y = transformer.attention_layer(
            attention.layer_kwargs("cross"), width, heads, 0.0, f"read{block}"
        )(y, memory)
        slots = keras.layers.Add()([slots, y])
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"slot{block}_norm")(slots)
        slots = keras.layers.Add()([slots, transformer.feed_forward(y, width, 0.0, f"slot{block}")])
    slots = keras.layers.LayerNormalization(epsilon=1e-6, name="slots_norm")(slots)
    centres = keras.layers.Dense(2, name="centres")(slots)
    return keras.Model(points, centres, name="clusters")


def matched_squared_error(centres, predicted):
    """Squared distance of the slots to the centres, in the best order."""
    # ORDERS[o, c] is the slot of centre c in order o.
    ordered = keras.ops.take(predicted, ORDERS, axis=1)  # (batch, orders, clusters, 2)
    errors = keras.ops.sum(keras.ops.square(ordered - centres[:, None]), axis=(-2, -1))
    return keras.ops.min(errors, axis=1) / CLUSTERS


def matched_distances(centres, predicted):
    """(examples, CLUSTERS): each true centre's distance to its slot, the
    slots matched in the order of least squared error."""
    distances = np.linalg.norm(predicted[:, ORDERS] - centres[:, None], axis=-1)
    best = np.argmin((distances**2).sum(-1), axis=1)
    return distances[np.arange(len(centres)), best]


def cluster_attention(report, members):
    """(examples, CLUSTERS): the mean attention a cluster's points receive
    (summed over the slots, averaged over the heads), the largest over the
    layers: a cluster some layer reads is not starved."""
    one_hot = members[..., None] == np.arange(CLUSTERS)
    per_layer = [
        (layer.column_sums.mean(axis=1)[..., None] * one_hot).sum(1) / one_hot.sum(1)
        for layer in report
    ]
    return np.max(per_layer, axis=0)


def starvation_and_errors(report, members, distances):
    """Whether the clusters whose points were starved are the ones missed:
    their count and recall against the others'."""
    bound = min(float(layer.lower_bound.min()) for layer in report)
    starved = cluster_attention(report, members) < bound * (1 - 1e-4)
    found = distances < RADIUS

    def recall(group):
        return float(found[group].mean()) if group.any() else None

    return {
        "analysed_clusters": int(starved.size),
        "starved_clusters": int(starved.sum()),
        "recall_of_starved_clusters": recall(starved),
        "recall_of_other_clusters": recall(~starved),
    }


def plot_labels(members):
    """The plot's labels for one example: slots for the queries, points named
    by cluster for the keys ("B3": the third point of cluster B)."""
    counts = np.zeros(CLUSTERS, int)
    names = []
    for cluster in members:
        counts[cluster] += 1
        names.append(f"{'ABCDEFGH'[cluster]}{counts[cluster]}")
    return {"query_labels": [f"slot {s + 1}" for s in range(CLUSTERS)], "key_labels": names}


def parse_args(argv=None):
    p = common.parser(
        __doc__.splitlines()[0], "explaining_away", epochs=20, batch_size=64,
        learning_rate=2e-3, output_dir="runs/explaining_away",
    )
    p.add_argument("--heads", type=int, default=4, help="attention heads per layer")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = common.Run(args)
    # The data are fixed (seed 0), so that every seed sees the same sets.
    points, members, centres = point_sets(args.limit or EXAMPLES)
    train, validation, test = datasets.split_indices(len(points), seed=0)

    def batches(indices, shuffle):
        return common.batches(points[indices], centres[indices], args.batch_size, shuffle, args.seed)

    model, history = common.compile_and_fit(
        run, lambda: build_model(args.attention, heads=args.heads),
        batches(train, shuffle=True), batches(validation, shuffle=False),
        loss=matched_squared_error, metrics=(),
    )
    predicted = model.predict(batches(test, shuffle=False), verbose=0)
    distances = matched_distances(centres[test], predicted)
    found = distances < RADIUS
    analysed = test[:ANALYSED]
    report = keras_dna.analysis.collect_attention(model, points[analysed])
    explaining_away = run.save_attention(
        model.name, report, layers=(0, 1), **plot_labels(members[analysed[0]])
    )
    metrics = run.write_metrics(
        "explaining_away",
        history,
        test_cluster_recall=float(found.mean()),
        test_centre_error=float(distances.mean()),
        heads=args.heads,
        explaining_away=explaining_away,
        per_layer=keras_dna.analysis.summarize(report),
        **starvation_and_errors(report, members[analysed], distances[:ANALYSED]),
    )
    print(
        f"test cluster recall {metrics['test_cluster_recall']:.4f}, centre error "
        f"{metrics['test_centre_error']:.4f}, min column sum "
        f"{explaining_away['min_column_sum']:.4f}; outputs in {run.output_dir}"
    )
    return metrics


if __name__ == "__main__":
    main()
