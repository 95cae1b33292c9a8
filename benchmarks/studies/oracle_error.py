"""Maximum error of DoublyNormalizedAttention against the float64 oracle, per dtype.

Runs the layer on random inputs under each dtype policy, with padding, an
attention mask and causal masking, and compares outputs and weights with the
NumPy float64 transcription in tests/oracle.py.

    python -m benchmarks.studies.oracle_error
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from keras_dna import DoublyNormalizedAttention  # noqa: E402
from tests import oracle  # noqa: E402

POLICIES = ["float64", "float32", "mixed_float16", "mixed_bfloat16"]


def main(argv=None):
    args = harness.parser(__doc__.splitlines()[0], "studies/oracle_error").parse_args(argv)
    # Seeded weights too, so that two runs (or two versions) print the same.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    batch, length, width = 4, 24, 32
    query = rng.normal(size=(batch, length, width))
    key_mask = np.arange(length)[None] < rng.integers(length // 2, length + 1, size=(batch, 1))
    attention_mask = rng.random((batch, length, length)) < 0.8
    errors = []
    for normalization, null_query in (
        ("double", False), ("hybrid", False), ("single", False), ("double", True),
    ):
        options = {"normalization": normalization, "null_query": null_query}
        label = normalization + (" + null query" if null_query else "")
        reference = DoublyNormalizedAttention(4, 8, dtype="float64", **options)
        reference(query, query)
        for policy in POLICIES:
            layer = DoublyNormalizedAttention(4, 8, dtype=policy, **options)
            layer(query.astype("float32"), query.astype("float32"))
            layer.set_weights(reference.get_weights())
            for name, kwargs, valid, causal in (
                ("padding+attention_mask", {"value_mask": key_mask, "attention_mask": attention_mask},
                 oracle.validity(batch, length, length, key_mask=key_mask, attention_mask=attention_mask), False),
                ("causal", {"use_causal_mask": True},
                 oracle.validity(batch, length, length, causal=True), True),
            ):
                inputs = query if policy == "float64" else query.astype("float32")
                out, weights = layer(inputs, inputs, return_attention_scores=True, **kwargs)
                want_out, want_weights = oracle.layer_forward(
                    layer, query, query, valid=valid, causal=causal
                )
                rows = valid.any(-1)
                out_error = np.abs(np.asarray(out, np.float64)[rows] - want_out[rows]).max()
                weight_error = np.abs(np.asarray(weights, np.float64) - want_weights).max()
                errors.append([policy, label, name, f"{out_error:.2e}", f"{weight_error:.2e}"])
    table = harness.markdown_table(
        "", ["dtype policy", "normalization", "masks", "max output error", "max weight error"], errors)
    harness.write_results(args, {"rows": errors}, table, argv)


if __name__ == "__main__":
    main()
