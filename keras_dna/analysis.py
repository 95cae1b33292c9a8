"""Measure explaining away: how much attention each key receives.

Softmax attention can leave a key with almost no attention from any query,
so its value never reaches the output. These tools record the attention
weights of every `keras.layers.MultiHeadAttention` in a model (plain ones and
`DoublyNormalizedAttention` alike) and of keras-hub's decoder attention
(Llama, Gemma, ...; converted or not), sum them over the queries (the
"column sums": the total attention each key receives), and summarize and
plot them.

    report = keras_dna.analysis.collect_attention(model, inputs)
    print(keras_dna.analysis.summarize(report))
    keras_dna.analysis.plot_attention({"softmax": report_a, "DNA": report_b}, "attention.png")

Heatmaps leave padded queries and keys out and take the plotted example's
labels, per layer when queries and keys differ (`attention_matrix` returns
what is drawn):

    keras_dna.analysis.plot_attention(
        {"g2p": report}, "attention.png", layers=("decoder0_cross",),
        query_labels=["<s>", "HH", "AH", "L", "OW"], key_labels=list("hello"),
    )
"""

import contextlib
import dataclasses
import sys

import keras
import numpy as np

from keras_dna._compat import attention_axes
from keras_dna._compat import child_layers
from keras_dna._compat import intercepted
from keras_dna._compat import on_softmax_path

__all__ = [
    "LayerAttention",
    "attention_layers",
    "causal_ceiling_statistics",
    "collect_attention",
    "explaining_away_statistics",
    "summarize",
    "AttentionMatrix",
    "attention_matrix",
    "plot_attention",
]


@dataclasses.dataclass
class LayerAttention:
    """The attention of one layer call on a batch.

    Attributes:
        name: The layer's name (with `#k` for its k-th call after the first).
        normalization: `"single"`, `"double"` or `"hybrid"`;
            `MultiHeadAttention` is `"single"`.
        weights: `(batch, heads, queries, keys)`; several attention axes are
            flattened into one.
        valid: Boolean `(batch, queries, keys)`: which pairs may attend (the
            layer's combined masks).
    """

    name: str
    normalization: str
    weights: np.ndarray
    valid: np.ndarray

    @property
    def column_sums(self):
        """`(batch, heads, keys)`: the total attention each key receives."""
        return self.weights.sum(axis=-2)

    @property
    def valid_column_sums(self):
        """1-D: the column sums of the valid keys, all examples and heads."""
        valid = np.broadcast_to(self.valid_keys[:, None, :], self.column_sums.shape)
        return self.column_sums[valid]

    @property
    def valid_keys(self):
        """`(batch, keys)`: keys that at least one query may attend to."""
        return self.valid.any(axis=-2)

    @property
    def lower_bound(self):
        """`(batch,)`: doubly-normalized attention's guaranteed column sum.

        `1 / max_i (number of valid keys of query i)`; 0 for an empty row.
        """
        widest = self.valid.sum(axis=-1).max(axis=-1)
        return np.where(widest > 0, 1.0 / np.maximum(widest, 1), 0.0)


def attention_layers(model):
    """All attention layers of `model` the analysis records, nested too:
    `MultiHeadAttention` (DNA included) and, where keras-hub is loaded, its
    decoder families' attention (converted or not)."""
    kinds = (keras.layers.MultiHeadAttention,) + _decoder_attention_classes()
    found = []

    def visit(layer):
        if isinstance(layer, kinds):
            found.append(layer)
        for child in child_layers(layer):
            visit(child)

    visit(model)
    return list({id(layer): layer for layer in found}.values())


def _decoder_attention_classes():
    """keras-hub's decoder attention classes, where keras-hub is loaded (a
    model holding them has loaded it; the analysis does not import it)."""
    if "keras_hub" not in sys.modules:
        return ()
    from keras_dna.hub.decoders import decoder_attention_classes

    return decoder_attention_classes()


@contextlib.contextmanager
def _recording(layers, records):
    """Records the weights of each call of `layers` into `records`:
    `(layer, weights, attention_mask, use_causal_mask)`."""

    def recorded(layer):
        def compute_attention(original, query, key, value, attention_mask=None, training=None,
                              return_attention_scores=False, use_causal_mask=False, **options):
            # Asking for the weights takes MultiHeadAttention off its fused
            # path, which computes the same attention without returning them.
            # `options`: what the layer's own call passes on (DNA's
            # `causal_normalization`).
            extra = {"use_causal_mask": True} if use_causal_mask else {}
            output, weights = original(
                query, key, value, attention_mask, training, True, **extra, **options
            )
            records.append((layer, weights, attention_mask, use_causal_mask))
            return output, weights

        return compute_attention

    def recorded_softmax(layer):
        def softmax(original, scores, mask=None):
            weights = original(scores, mask=mask)
            records.append((layer, weights, mask, False))
            return weights

        return softmax

    with contextlib.ExitStack() as stack:
        decoders = _decoder_attention_classes()
        if decoders:
            from keras_dna.hub.decoders import softmax_of

            # keras-hub's own layers then weigh with their softmax too.
            stack.enter_context(on_softmax_path())
        for layer in layers:
            if isinstance(layer, decoders):
                stack.enter_context(intercepted(softmax_of(layer), "call", recorded_softmax(layer)))
            else:
                stack.enter_context(intercepted(layer, "_compute_attention", recorded(layer)))
        yield


def _flatten(layer, weights, mask, causal):
    """Weights to (B', heads, T, S) and the validity to (B', T, S)."""
    weights = np.asarray(keras.ops.convert_to_numpy(weights), np.float64)
    if isinstance(layer, _decoder_attention_classes()):
        weights, mask = _heads_on_one_axis(layer, weights, mask)
        axes = 1
    else:
        axes = len(attention_axes(layer))
    shape = weights.shape
    queries = int(np.prod(shape[len(shape) - 2 * axes : len(shape) - axes]))
    keys = int(np.prod(shape[len(shape) - axes :]))
    heads = shape[-2 * axes - 1]
    weights = weights.reshape((-1, heads, queries, keys))
    if mask is None:
        valid = np.ones((queries, keys), bool)
        if causal:
            valid = np.tril(valid)
        valid = np.broadcast_to(valid, (weights.shape[0], queries, keys))
    else:
        mask = np.asarray(keras.ops.convert_to_numpy(mask), bool)
        # Insert the heads axis where the mask lacks it; broadcast; drop it.
        while mask.ndim < len(shape):
            mask = np.expand_dims(mask, -2 * axes - 1)
        if mask.shape[-2 * axes - 1] != 1:
            raise _per_head_mask_error(layer)
        mask = np.broadcast_to(mask, shape[:-2 * axes - 1] + (1,) + shape[-2 * axes:])
        valid = mask.reshape((-1, queries, keys))
    return weights, np.array(valid)


def _heads_on_one_axis(layer, weights, mask):
    """keras-hub decoders' weights `(batch, heads..., T, S)`, heads on one
    axis or two (Gemma's key heads and their query groups), and their mask,
    with the heads on one axis."""
    weights = weights.reshape(weights.shape[:1] + (-1,) + weights.shape[-2:])
    if mask is not None:
        mask = np.asarray(keras.ops.convert_to_numpy(mask), bool)
        if int(np.prod(mask.shape[1:-2])) != 1:
            raise _per_head_mask_error(layer)
        mask = mask.reshape(mask.shape[:1] + (1,) + mask.shape[-2:])
    return weights, mask


def _per_head_mask_error(layer):
    return ValueError(
        f"Layer `{layer.name}` was called with a per-head attention mask: "
        "the analysis counts valid keys per query, the same for every "
        "head, and cannot report this call. Analyse a call without it."
    )


def collect_attention(model, inputs, layers=None):
    """Runs `model` on `inputs` once, eagerly, and records every attention.

    Args:
        model: A Keras model (or layer) containing attention layers.
        inputs: What `model` is called with.
        layers: Optional list of attention layers to record; defaults to
            `attention_layers(model)`.

    Returns:
        A list of `LayerAttention`, one per layer call, in call order.
    """
    layers = attention_layers(model) if layers is None else list(layers)
    if not layers:
        raise ValueError(
            "Argument `model` has no keras.layers.MultiHeadAttention (or "
            "DoublyNormalizedAttention) layer, nor keras-hub decoder attention, "
            "to analyse."
        )
    records = []
    with _recording(layers, records):
        model(inputs, training=False)
    calls = {}
    report = []
    for layer, weights, mask, causal in records:
        count = calls.get(layer.name, 0)
        calls[layer.name] = count + 1
        flat_weights, valid = _flatten(layer, weights, mask, causal)
        report.append(LayerAttention(
            name=layer.name if count == 0 else f"{layer.name}#{count}",
            normalization=getattr(layer, "normalization", "single"),
            weights=flat_weights,
            valid=valid,
        ))
    return report


def causal_ceiling_statistics(report):
    """How far causal self-attention layers sit from the causal ceiling.

    Causal double normalization without a null query always gives each
    query at least as much weight on itself as on any earlier key
    (docs/math.md, "The causal ceiling" and property 8); softmax and the
    null query need not.

    Args:
        report: A `LayerAttention` or a list of them. Only causal
            self-attention calls count: as many queries as keys, and no
            valid pair with a key after its query.

    Returns:
        A dict: `rows` (rows of those layers with the diagonal and at least
        one earlier key valid, per head), `diagonal_max_share` (the share
        of them whose largest weight is on the diagonal) and
        `max_earlier_weight` (the largest weight any query gives an
        earlier key); `None` values when the report has no such layer.
    """
    if isinstance(report, LayerAttention):
        report = [report]
    diagonal_is_max, earlier_max = [], []
    for layer in report:
        _, _, queries, keys = layer.weights.shape
        upper = np.triu(np.ones((queries, keys), bool), 1)
        if queries != keys or (layer.valid & upper).any():
            continue
        earlier = layer.valid & np.tril(np.ones((queries, keys), bool), -1)
        diagonal = np.diagonal(layer.weights, axis1=-2, axis2=-1)
        rows = np.diagonal(layer.valid, axis1=-2, axis2=-1) & earlier.any(axis=-1)
        earlier_weights = np.where(earlier[:, None], layer.weights, 0.0).max(axis=-1)
        rows = np.broadcast_to(rows[:, None], diagonal.shape)
        # A relative tolerance for float32 rounding of ties (B = 1 off the diagonal).
        diagonal_is_max.append((diagonal >= earlier_weights * (1 - 1e-5))[rows])
        earlier_max.append(earlier_weights[rows])
    if not diagonal_is_max or not np.concatenate(diagonal_is_max).size:
        return {"rows": 0, "diagonal_max_share": None, "max_earlier_weight": None}
    diagonal_is_max = np.concatenate(diagonal_is_max)
    return {
        "rows": int(diagonal_is_max.size),
        "diagonal_max_share": float(diagonal_is_max.mean()),
        "max_earlier_weight": float(np.concatenate(earlier_max).max()),
    }


def explaining_away_statistics(report, threshold=0.1):
    """Summary statistics of the column sums of valid keys.

    Args:
        report: A `LayerAttention` or a list of them (pooled).
        threshold: Column sums below it count as explained away.

    Returns:
        A dict: `keys` (valid key-head pairs), `min_column_sum`,
        `mean_column_sum`, `share_below_threshold`, and
        `share_below_bound`: the share of keys receiving less than
        doubly-normalized attention's guarantee (0 for DNA, by the theorem).
    """
    if isinstance(report, LayerAttention):
        report = [report]
    sums, below_bound = [], []
    for layer in report:
        valid = np.broadcast_to(layer.valid_keys[:, None, :], layer.column_sums.shape)
        bound = layer.lower_bound[:, None, None]
        sums.append(layer.valid_column_sums)
        # A relative tolerance keeps float32 rounding of weights that sit
        # exactly on the bound from counting as a violation.
        below_bound.append((layer.column_sums < bound * (1 - 1e-4))[valid])
    sums = np.concatenate(sums)
    below_bound = np.concatenate(below_bound)
    if sums.size == 0:
        raise ValueError("The report has no valid key to measure.")
    return {
        "keys": int(sums.size),
        "min_column_sum": float(sums.min()),
        "mean_column_sum": float(sums.mean()),
        "share_below_threshold": float((sums < threshold).mean()),
        "share_below_bound": float(below_bound.mean()),
    }


def summarize(report, threshold=0.1):
    """`explaining_away_statistics` per layer call, plus `"all"` pooled."""
    summary = {layer.name: explaining_away_statistics(layer, threshold) for layer in report}
    summary["all"] = explaining_away_statistics(report, threshold)
    return summary


@dataclasses.dataclass
class AttentionMatrix:
    """One example's attention in one layer, with padding left out.

    Attributes:
        weights: `(valid queries, valid keys)`: the rows of queries with at
            least one valid key and the columns of keys at least one query
            may attend to.
        query_labels, key_labels: One string per row and per column.
        queries, keys: The positions (along the layer's flattened query and
            key axes) of the rows and columns kept.
        heads: What `weights` shows, e.g. `"head 2"` or `"mean of 4 heads"`.
    """

    weights: np.ndarray
    query_labels: list
    key_labels: list
    queries: np.ndarray
    keys: np.ndarray
    heads: str


def _check_index(name, value, count, allow_none=False):
    if allow_none and value is None:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value < count:
        allowed = "None or an integer" if allow_none else "an integer"
        raise ValueError(
            f"Argument `{name}` must be {allowed} in [0, {count}). Received: {name}={value!r}"
        )


def _kept_labels(labels, kept, name, what):
    """The labels of the kept positions; `labels` has one per position or
    one per kept position."""
    positions = np.flatnonzero(kept)
    if labels is None:
        return [str(p) for p in positions]
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise TypeError(
            f"Argument `{name}` must be a sequence of labels, one per {what}. "
            f"Received: {name}={labels!r}"
        )
    labels = [label.decode() if isinstance(label, bytes) else str(label) for label in labels]
    if len(labels) == kept.size:
        return [labels[p] for p in positions]
    if len(labels) == positions.size:
        return labels
    raise ValueError(
        f"Argument `{name}` must have one label per {what} position ({kept.size}) or "
        f"per valid {what} ({positions.size}). Received {len(labels)} labels."
    )


def _heads_shown(head, heads):
    if heads == 1:
        return "head 0 (the only head)"
    return f"mean of {heads} heads" if head is None else f"head {head}"


def attention_matrix(layer, example=0, head=None, query_labels=None, key_labels=None):
    """The weights `plot_attention` draws: one example, padding left out.

    Args:
        layer: A `LayerAttention` (an item of `collect_attention`'s report).
        example: Which example of the batch.
        head: Which head; `None` averages the heads.
        query_labels: Optional labels (e.g. tokens), one per position of
            the layer's queries, padding included, or one per valid query.
            Default: the positions.
        key_labels: The same for the keys.

    Returns:
        An `AttentionMatrix`.
    """
    if not isinstance(layer, LayerAttention):
        raise TypeError(
            f"Argument `layer` must be a LayerAttention. Received: layer={layer!r}"
        )
    batch, heads = layer.weights.shape[:2]
    _check_index("example", example, batch)
    _check_index("head", head, heads, allow_none=True)
    valid = layer.valid[example]
    queries, keys = valid.any(axis=1), valid.any(axis=0)
    if not queries.any():
        raise ValueError(
            f"Argument `example`: example {example} has no valid query in layer {layer.name!r}."
        )
    weights = layer.weights[example]
    weights = weights.mean(axis=0) if head is None else weights[head]
    return AttentionMatrix(
        weights=weights[np.ix_(queries, keys)],
        query_labels=_kept_labels(query_labels, queries, "query_labels", "query"),
        key_labels=_kept_labels(key_labels, keys, "key_labels", "key"),
        queries=np.flatnonzero(queries),
        keys=np.flatnonzero(keys),
        heads=_heads_shown(head, heads),
    )


def _chosen_layers(report, layers):
    """The `LayerAttention`s of `report` named or indexed by `layers`."""
    if isinstance(layers, (str, int)) or not hasattr(layers, "__iter__"):
        raise TypeError(
            "Argument `layers` must be a sequence of layer indices or names. "
            f"Received: layers={layers!r}"
        )
    by_name = {layer.name: layer for layer in report}
    chosen = []
    for item in layers:
        if isinstance(item, str) and item in by_name:
            chosen.append(by_name[item])
        elif isinstance(item, (int, np.integer)) and -len(report) <= item < len(report):
            chosen.append(report[item])
        else:
            raise ValueError(
                f"Argument `layers`: {item!r} is neither a layer name nor an index of "
                f"the report; its layers are {list(by_name)}."
            )
    if not chosen:
        raise ValueError("Argument `layers` must name at least one layer.")
    return chosen


def _labels_of(labels, layer_name, name, known_names):
    """`labels` itself, or its entry for the layer when it is a dict."""
    if not isinstance(labels, dict):
        return labels
    unknown = set(labels) - set(known_names)
    if unknown:
        raise ValueError(
            f"Argument `{name}` has labels for layers the reports do not have: "
            f"{sorted(unknown)}; their layers are {sorted(known_names)}."
        )
    return labels.get(layer_name)


def _label_ticks(axis, labels, which, max_ticks):
    """At most `max_ticks` labelled ticks, smaller type for longer axes."""
    step = -(-len(labels) // max_ticks)
    ticks = np.arange(0, len(labels), step)
    size = 9 if len(labels) <= 16 else 8 if len(labels) <= 28 else 7
    if which == "x":
        axis.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize=size)
    else:
        axis.set_yticks(ticks, [labels[t] for t in ticks], fontsize=size)


def _draw_heatmap(figure, axis, matrix, title, max_ticks):
    # The figure is sized by the counts, so "auto" keeps cells near square
    # while a few queries over many keys still get readable rows.
    image = axis.imshow(matrix.weights, cmap="viridis", vmin=0.0, aspect="auto",
                        interpolation="nearest")
    _label_ticks(axis, matrix.key_labels, "x", max_ticks)
    _label_ticks(axis, matrix.query_labels, "y", max_ticks)
    axis.set_xlabel(f"key ({len(matrix.key_labels)} valid)")
    axis.set_ylabel(f"query ({len(matrix.query_labels)} valid)")
    axis.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axis, shrink=0.8, label="attention weight")


def _draw_column_sums(axis, report, model):
    axis.hist(np.concatenate([layer.valid_column_sums for layer in report]), bins=50,
              color="tab:blue")
    bound = min(float(layer.lower_bound[layer.lower_bound > 0].min()) for layer in report)
    axis.axvline(bound, color="tab:red", linestyle="--", label="DNA lower bound")
    axis.set_title(f"{model}: attention received per key\n(all layers, examples, heads)",
                   fontsize=10)
    axis.set_xlabel("column sum")
    axis.set_ylabel("keys")
    axis.set_yscale("log")
    axis.legend(fontsize=8)


def _cell_inches(count):
    # About a quarter inch per row or column keeps 8-point labels apart.
    return min(max(0.25 * count, 2.5), 12.0)


def plot_attention(reports, path, layers=(0,), example=0, head=None,
                   query_labels=None, key_labels=None, max_ticks=40):
    """Writes a PNG comparing reports, e.g. softmax beside DNA.

    One row per report: for each chosen layer, a heatmap of one example's
    weights (queries down, keys across; padded queries and keys left out, see
    `attention_matrix`), and a histogram of the column sums of all valid keys
    of all layers, with DNA's lower bound marked.

    Args:
        reports: Dict of a model's name to the list `collect_attention`
            returned for it; the names appear in the titles.
        path: Where to write the PNG.
        layers: Indices (in call order) or names of the layers to draw.
        example: Which example of the batch.
        head: Which head; `None` (the default) draws the mean of the heads.
        query_labels: The example's labels (e.g. tokens), one per query
            position or per valid query, for every drawn layer; or a dict of
            layer name to such labels, for layers whose queries differ, e.g.
            cross-attention. Default: positions.
        key_labels: The same for the keys.
        max_ticks: At most this many labelled ticks per axis.

    Returns:
        `path`.
    """
    if not isinstance(reports, dict) or not reports:
        raise TypeError(
            "Argument `reports` must be a non-empty dict of name to the list "
            f"collect_attention returned. Received: reports={reports!r}"
        )
    if not isinstance(max_ticks, int) or isinstance(max_ticks, bool) or max_ticks < 1:
        raise ValueError(
            f"Argument `max_ticks` must be a positive integer. Received: max_ticks={max_ticks!r}"
        )
    names = {layer.name for report in reports.values() for layer in report}
    rows = []
    for model, report in reports.items():
        matrices = [
            (layer, attention_matrix(
                layer, example, head,
                _labels_of(query_labels, layer.name, "query_labels", names),
                _labels_of(key_labels, layer.name, "key_labels", names),
            ))
            for layer in _chosen_layers(report, layers)
        ]
        rows.append((model, report, matrices))
    _draw(rows, path, example, max_ticks)
    return path


def _draw(rows, path, example, max_ticks):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(rows[0][2])
    widths = [
        max(_cell_inches(len(row[2][c][1].key_labels)) for row in rows) + 1.8
        for c in range(columns)
    ] + [4.5]
    heights = [
        max(_cell_inches(len(m.query_labels)) for _, m in row[2]) + 1.8 for row in rows
    ]
    figure, axes = plt.subplots(
        len(rows), columns + 1, figsize=(sum(widths), sum(heights)), squeeze=False,
        gridspec_kw={"width_ratios": widths, "height_ratios": heights},
        layout="constrained",
    )
    for r, (model, report, matrices) in enumerate(rows):
        for c, (layer, matrix) in enumerate(matrices):
            title = f"{model}: {layer.name} ({layer.normalization})\n{matrix.heads}, example {example}"
            _draw_heatmap(figure, axes[r, c], matrix, title, max_ticks)
        _draw_column_sums(axes[r, -1], report, model)
    figure.savefig(path, dpi=100)
    plt.close(figure)
