"""Measure explaining away: how much attention each key receives.

Softmax attention can leave a key with almost no attention from any query,
so its value never reaches the output. These tools record the attention
weights of every `keras.layers.MultiHeadAttention` in a model (plain ones and
`DoublyNormalizedAttention` alike), sum them over the queries (the
"column sums": the total attention each key receives), and summarize and
plot them.

    report = keras_dna.analysis.collect_attention(model, inputs)
    print(keras_dna.analysis.summarize(report))
    keras_dna.analysis.plot_attention({"softmax": report_a, "DNA": report_b}, "attention.png")
"""

import contextlib
import dataclasses

import keras
import numpy as np

__all__ = [
    "LayerAttention",
    "attention_layers",
    "causal_ceiling_statistics",
    "collect_attention",
    "explaining_away_statistics",
    "summarize",
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
    """All `MultiHeadAttention` layers (DNA included) in `model`, nested too."""
    found = []

    def visit(layer):
        if isinstance(layer, keras.layers.MultiHeadAttention):
            found.append(layer)
        for child in getattr(layer, "_layers", []):
            visit(child)

    visit(model)
    return list({id(layer): layer for layer in found}.values())


@contextlib.contextmanager
def _recording(layers, records):
    """Records the weights of each call of `layers` into `records`."""
    for layer in layers:
        compute_attention = layer._compute_attention

        def recorded(query, key, value, attention_mask=None, training=None,
                     return_attention_scores=False, use_causal_mask=False,
                     _layer=layer, _compute=compute_attention):
            # Asking for the weights takes MultiHeadAttention off its fused
            # path, which computes the same attention without returning them.
            extra = {"use_causal_mask": True} if use_causal_mask else {}
            output, weights = _compute(
                query, key, value, attention_mask, training, True, **extra
            )
            records.append((_layer, weights, attention_mask, use_causal_mask))
            return output, weights

        # An instance attribute shadows the method for this layer only.
        object.__setattr__(layer, "_compute_attention", recorded)
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "_compute_attention")


def _flatten(layer, weights, mask, causal):
    """Weights to (B', heads, T, S) and the validity to (B', T, S)."""
    weights = np.asarray(keras.ops.convert_to_numpy(weights), np.float64)
    axes = len(layer._attention_axes)
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
        # The layer's mask lacks the heads axis; insert it, broadcast, drop it.
        while mask.ndim < len(shape):
            mask = np.expand_dims(mask, -2 * axes - 1)
        mask = np.broadcast_to(mask, shape[:-2 * axes - 1] + (1,) + shape[-2 * axes:])
        valid = mask.reshape((-1, queries, keys))
    return weights, np.array(valid)


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
            "DoublyNormalizedAttention) layer to analyse."
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
    query at least as much weight on itself as on any earlier key (DNA.md,
    "The causal ceiling"); softmax and the null query need not.

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
        sums.append(layer.column_sums[valid])
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


def plot_attention(reports, path, layer_index=0, example=0, head=0):
    """Writes a PNG comparing reports, e.g. softmax beside DNA.

    One row per report: a heatmap of one head's weights (queries down, keys
    across) for one layer and example, and a histogram of the column sums of
    all valid keys of all layers, with DNA's lower bound marked.

    Args:
        reports: Dict of label to the list `collect_attention` returned.
        path: Where to write the PNG.
        layer_index, example, head: Which weights the heatmap shows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(reports), 2, figsize=(10, 3.6 * len(reports)), squeeze=False)
    for row, (label, report) in enumerate(reports.items()):
        chosen = report[layer_index]
        heatmap = axes[row, 0].imshow(chosen.weights[example, head], cmap="viridis", aspect="auto")
        axes[row, 0].set_title(f"{label}: {chosen.name}, head {head}")
        axes[row, 0].set_xlabel("key")
        axes[row, 0].set_ylabel("query")
        figure.colorbar(heatmap, ax=axes[row, 0])
        sums = np.concatenate([
            layer.column_sums[np.broadcast_to(layer.valid_keys[:, None, :], layer.column_sums.shape)]
            for layer in report
        ])
        axes[row, 1].hist(sums, bins=50, color="tab:blue")
        bound = min(float(layer.lower_bound[layer.lower_bound > 0].min()) for layer in report)
        axes[row, 1].axvline(bound, color="tab:red", linestyle="--", label="DNA lower bound")
        axes[row, 1].set_title(f"{label}: attention received per key (all layers)")
        axes[row, 1].set_xlabel("column sum")
        axes[row, 1].set_yscale("log")
        axes[row, 1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
