"""`keras.Input`s for the functions of `keras_dna.ops`.

The functions use data-dependent branches and custom gradients, which only
run on concrete (or backend-traced) tensors. Given a symbolic tensor, a
function places itself in the functional model's graph as a
`keras.Operation`, whose output shape Keras finds by tracing; the model saves
the function's name and the call's arguments.
"""

import functools
import importlib

import keras


@keras.saving.register_keras_serializable(package="keras_dna")
class _SymbolicFunction(keras.Operation):
    """A public function of `keras_dna.ops`, in a functional model's graph.

    Serialized by the function's name (its class name is part of saved
    models, hence kept).
    """

    def __init__(self, function, name=None):
        super().__init__(name=name)
        self.function = function

    def call(self, *args, **kwargs):
        # Imported here: `keras_dna.ops` imports this module.
        public = importlib.import_module("keras_dna.ops")
        return getattr(public, self.function)(*args, **kwargs)

    def get_config(self):
        return {"function": self.function, "name": self.name}


def symbolic_inputs_allowed(fn):
    """Lets `fn`, a public function of `keras_dna.ops`, take `keras.Input`s."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _holds_keras_tensor((args, kwargs)):
            return _SymbolicFunction(fn.__name__)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _holds_keras_tensor(value):
    """Whether a nest of tuples, lists and dicts holds a `keras.KerasTensor`.

    (`keras.tree.flatten` under PyTorch breaks `torch.compile`'s graph at
    every call of a function.)
    """
    if isinstance(value, (tuple, list)):
        return any(_holds_keras_tensor(item) for item in value)
    if isinstance(value, dict):
        return any(_holds_keras_tensor(item) for item in value.values())
    return keras.utils.is_keras_tensor(value)
