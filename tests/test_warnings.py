"""pytest.ini: a deprecation raised from keras_dna's own code fails the tests.

Without the `filterwarnings` lines of pytest.ini, pytest only records these
warnings (DeprecationWarning and PendingDeprecationWarning are shown in the
summary, FutureWarning once per location), and every test here fails.
"""

import warnings

import pytest

DEPRECATIONS = [DeprecationWarning, PendingDeprecationWarning, FutureWarning]


def _function_of_module(module_name, source, name):
    """A function defined in a module named `module_name`: warnings it raises
    are attributed to that module, as to any module of the package."""
    namespace = {"__name__": module_name, "warnings": warnings}
    exec(compile(source, f"<{module_name}>", "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("category", DEPRECATIONS)
@pytest.mark.parametrize("module", ["keras_dna", "keras_dna.ops.dispatch", "keras_dna.hub.transformer"])
def test_a_deprecation_attributed_to_keras_dna_is_an_error(category, module):
    with pytest.raises(category, match="scheduled for removal"):
        warnings.warn_explicit(
            "scheduled for removal", category, f"{module.replace('.', '/')}.py", 1, module=module
        )


@pytest.mark.parametrize("category", DEPRECATIONS)
def test_keras_dna_calling_a_deprecated_api_is_an_error(category):
    # A library warns with stacklevel=2: the warning names its caller, here a
    # function of keras_dna, which is what must change.
    deprecated = _function_of_module(
        "some_library",
        f"def deprecated():\n    warnings.warn('use the new API', {category.__name__}, stacklevel=2)\n",
        "deprecated",
    )
    caller = _function_of_module(
        "keras_dna.some_module", "def call(deprecated):\n    deprecated()\n", "call"
    )
    with pytest.raises(category, match="use the new API"):
        caller(deprecated)
    # Called from elsewhere, the same warning is only recorded.
    with pytest.warns(category, match="use the new API"):
        deprecated()


@pytest.mark.parametrize("module", ["keras", "tensorflow.python.ops", "keras_dna_extras", "my.keras_dna"])
def test_a_deprecation_from_other_code_stays_a_warning(module):
    with pytest.warns(DeprecationWarning):
        warnings.warn_explicit("old", DeprecationWarning, "other.py", 1, module=module)


def test_other_warnings_from_keras_dna_stay_warnings():
    with pytest.warns(UserWarning):
        warnings.warn_explicit("note", UserWarning, "keras_dna/x.py", 1, module="keras_dna.x")
