"""Installs attnres_jax: Attention Residuals (arXiv 2603.15031) in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="attnres_jax",
    version="0.1.0",
    description="Attention Residuals (AttnRes): depth-wise softmax attention over sublayer outputs, in JAX/Flax NNX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["attnres_jax", "attnres_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tokenizers>=0.21",
        "pyarrow>=17",
        "zstandard>=0.23",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "jax[tpu]>=0.10.2,<0.13"],  # libtpu: the tests compile for TPU slices ahead of time
        "cuda": ["jax[cuda12]>=0.10.2,<0.13"],
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
    },
)
