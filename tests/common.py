"""Small helpers shared by the test modules of keras_dna.ops."""

import numpy as np

from keras_dna import ops as dna_ops


def random_valid(rng, shape, keep=0.7):
    """A random boolean mask keeping about `keep` of the entries."""
    return rng.random(shape) < keep


def normalize(scores, valid=None, **kwargs):
    """`normalize_attention_scores` as a NumPy array."""
    return np.asarray(dna_ops.normalize_attention_scores(scores, valid, **kwargs))
