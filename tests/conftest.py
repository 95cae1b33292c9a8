import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The `flash_attention` of each `keras.ops.dot_product_attention` call
    made since (the fused kernels' calls)."""
    import keras

    calls = []
    kernel = keras.ops.dot_product_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("flash_attention"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(keras.ops, "dot_product_attention", counted)
    return calls


# Hypothesis (tests/test_fuzz.py): `ci` is seeded and bounded for the suite;
# `long` (HYPOTHESIS_PROFILE=long) runs by hand, unseeded, 100x the cases.
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import settings  # noqa: E402

_FUZZ_SETTINGS = {
    "deadline": None,  # first calls trace and compile
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=25, derandomize=True, **_FUZZ_SETTINGS)
settings.register_profile("long", max_examples=2500, **_FUZZ_SETTINGS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
