"""Keras's own attention tests, run against keras_dna's drop-ins.

Keras's `MultiHeadAttention` tests run against `DoublyNormalizedAttention`,
its `GroupQueryAttention` tests against `DoublyNormalizedGroupQueryAttention`.
The test files ship in the keras wheel. Each is loaded from the installed
keras with the Keras layer swapped for ours: with `normalization="single"`
every test must pass (a drop-in replacement); with `"double"` exactly the
tests that compare against softmax values must differ, each for the reason
listed.
"""

import importlib.util
import pathlib
import types
import unittest

import keras
import pytest
from keras.src import layers as keras_layers

from keras_dna import DoublyNormalizedAttention
from keras_dna import DoublyNormalizedGroupQueryAttention

KERAS_TESTS = pathlib.Path(keras.__file__).parent / "src" / "layers" / "attention"

# Under double normalization, `use_causal_mask=True` normalizes causally
# (no query's weights depend on later queries), while the same lower-
# triangular mask passed as `attention_mask` leaves the per-key step over
# all queries the mask allows (`causal_normalization=True` asks for causal).
# Softmax has no per-key step, so there the two agree.
_CAUSAL_FLAG_VERSUS_MASK = (
    "compares use_causal_mask=True with the same causal mask given as "
    "attention_mask, which DNA normalizes differently by design"
)
# The same names in both suites: Keras's tests of MultiHeadAttention and of
# GroupQueryAttention share them.
DIFFERENT_UNDER_DOUBLE = {
    "test_causal_only_fast_path": _CAUSAL_FLAG_VERSUS_MASK,
    "test_causal_only_masks_when_fused_path_disabled_dropout_only": _CAUSAL_FLAG_VERSUS_MASK,
    "test_causal_only_with_other_mask_falls_back": _CAUSAL_FLAG_VERSUS_MASK,
    "test_compute_attention_combines_causal_and_explicit_mask_fused_fallback": (
        _CAUSAL_FLAG_VERSUS_MASK
    ),
    "test_compute_attention_combines_causal_and_explicit_mask_manual_path": (
        _CAUSAL_FLAG_VERSUS_MASK
    ),
    "test_masking_causal": _CAUSAL_FLAG_VERSUS_MASK,
    "test_causal_only_skipped_for_subclass": (
        "a subclass whose _compute_attention cannot take causal_normalization "
        "is refused a causal call, which it would normalize over later queries"
    ),
}

class _Result(unittest.TestResult):
    """Counts `pytest.skip` inside a test as a skip, not an error."""

    def addError(self, test, err):
        if issubclass(err[0], pytest.skip.Exception):
            self.addSkip(test, str(err[1]))
        else:
            super().addError(test, err)


def _swapped_test_case(normalization, test_file, test_case, keras_names, ours):
    """Keras's test case in `test_file`, each of its layers `keras_names`
    our subclass of `ours` with `normalization`."""
    spec = importlib.util.spec_from_file_location(
        f"keras_{test_file[:-3]}_{normalization}", KERAS_TESTS / test_file
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    @keras.saving.register_keras_serializable(
        package="keras_dna_tests", name=f"{ours.__name__}_{normalization}"
    )
    class Swapped(ours):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("normalization", normalization)
            super().__init__(*args, **kwargs)

    swapped_layers = types.ModuleType("layers")
    swapped_layers.__dict__.update(vars(keras_layers))
    for name in keras_names:
        setattr(swapped_layers, name, Swapped)
    module.layers = swapped_layers
    return getattr(module, test_case)


SUITES = {
    "multi_head": (
        "multi_head_attention_test.py", "MultiHeadAttentionTest", ("MultiHeadAttention",),
        DoublyNormalizedAttention, DIFFERENT_UNDER_DOUBLE,
    ),
    "group_query": (
        "grouped_query_attention_test.py", "GroupedQueryAttentionTest",
        # Its causal tests are the MultiHeadAttention suite's, by name.
        ("GroupedQueryAttention", "GroupQueryAttention"), DoublyNormalizedGroupQueryAttention,
        DIFFERENT_UNDER_DOUBLE,
    ),
}


def _suite(name, normalization):
    return _swapped_test_case(normalization, *SUITES[name][:4])


# Collected by pytest: every Keras test, against "single".
class TestKerasSuiteWithSingleNormalization(_suite("multi_head", "single")):
    pass


class TestKerasGroupQuerySuiteWithSingleNormalization(_suite("group_query", "single")):
    pass


@pytest.mark.parametrize("name", list(SUITES))
def test_keras_suite_with_double_normalization_differs_exactly_where_expected(name):
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(_suite(name, "double"))
    result = _Result()
    suite.run(result)
    failed = {test.id().rsplit(".", 1)[-1] for test, _ in result.failures + result.errors}
    assert suite.countTestCases() > 20
    assert failed == set(SUITES[name][4]), {
        test.id(): trace.splitlines()[-1] for test, trace in result.failures + result.errors
    }
