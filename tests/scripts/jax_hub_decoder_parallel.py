"""One training step of a converted keras-hub Llama, on one device and under
`keras.distribution.ModelParallel` with Llama's own layout map.

Used by tests/test_jax_distribution.py. A tiny `LlamaCausalLM` (no preset)
is converted to DNA with the null query, then takes one `train_on_batch`
step (SGD, batch 8) from the same weights on one device and on a (2, 4)
("batch", "model") mesh of 8 virtual CPU devices laid out by
`LlamaBackbone.get_layout_map`. The last line of stdout is a JSON object:
the losses, the largest weight difference after the step, the largest
update, and the sharding spec of a query kernel under ModelParallel.
"""

import os
import re

DEVICE_COUNT = 8
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("JAX_ENABLE_X64", None)
_flags = re.sub(rf"{_DEVICE_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f"{_DEVICE_FLAG}={DEVICE_COUNT}"])

import json  # noqa: E402

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_dna.hub  # noqa: E402, F401
from keras_dna import convert  # noqa: E402

SEED = 7


def one_step(initial_weights, batch):
    keras.utils.set_random_seed(SEED)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=24, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=16, intermediate_dim=32,
    )
    model = convert.to_doubly_normalized(
        keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None), null_query=True
    )
    if initial_weights is not None:
        model.set_weights(initial_weights)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    loss = float(model.train_on_batch(*batch, return_dict=True)["loss"])
    return model, loss


def main():
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(1, 24, size=(8, 6)).astype("int32")
    batch = ({"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)},
             np.roll(tokens, -1, axis=1))
    keras.utils.set_random_seed(SEED)
    reference, _ = one_step(None, batch)  # the initial weights
    initial = reference.get_weights()
    reference, reference_loss = one_step(initial, batch)
    expected = reference.get_weights()
    devices = keras.distribution.list_devices("cpu")
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layout_map = keras_hub.models.LlamaBackbone.get_layout_map(mesh)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        model, loss = one_step(initial, batch)
        weights = model.get_weights()
        kernel = next(w for w in model.weights if w.path.endswith("self_attention/query/kernel"))
        spec = [None if a is None else str(a) for a in kernel.value.sharding.spec]
    difference = max(float(np.abs(a - b).max()) for a, b in zip(weights, expected))
    update = max(float(np.abs(a - b).max()) for a, b in zip(expected, initial))
    logits = [w.path for w in model.weights if w.path.endswith("null_query_logits")]
    print(json.dumps({
        "devices": len(devices), "loss": loss, "reference_loss": reference_loss,
        "max_weight_difference": difference, "max_update": update,
        "query_kernel_spec": spec, "null_query_logits": logits,
    }))


if __name__ == "__main__":
    main()
