"""Transformer blocks shared by the examples, built on keras_dna's public API."""

import keras

import keras_dna


@keras.saving.register_keras_serializable(package="keras_dna_examples")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position to a (batch, length, width) input."""

    def __init__(self, max_length, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length
        self.supports_masking = True

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.max_length, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, inputs):
        length = keras.ops.shape(inputs)[1]
        return inputs + keras.ops.cast(self.embeddings[:length], inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length}


def attention_layer(attention, width, heads, dropout, name, causal_normalization=False):
    """`attention`: the site's layer keyword arguments, e.g. {"normalization": "double"}."""
    return keras_dna.DoublyNormalizedAttention(
        num_heads=heads,
        key_dim=width // heads,
        dropout=dropout,
        causal_normalization=causal_normalization,
        name=name,
        **attention,
    )


def feed_forward(x, width, dropout, name):
    y = keras.layers.Dense(2 * width, activation="gelu", name=f"{name}_up")(x)
    y = keras.layers.Dense(width, name=f"{name}_down")(y)
    return keras.layers.Dropout(dropout)(y)


def encoder_block(x, attention, heads, dropout, name):
    """Pre-norm self-attention and feed-forward block; Keras masks flow through.

    `attention`: the layer keyword arguments of the encoder site.
    """
    width = x.shape[-1]
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm1")(x)
    y = attention_layer(attention, width, heads, dropout, f"{name}_attention")(y, y)
    x = keras.layers.Add()([x, keras.layers.Dropout(dropout)(y)])
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm2")(x)
    return keras.layers.Add()([x, feed_forward(y, width, dropout, f"{name}_ffn")])
