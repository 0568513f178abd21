"""Installable package for the attention-variants / token-free JAX research codebase."""
import setuptools

setuptools.setup(
    name="bytelab",
    version="0.1.0",
    description="Attention variants and token-free byte-level language models in JAX/Flax.",
    python_requires=">=3.12",
    packages=setuptools.find_packages(include=["configs*", "models*", "ops*", "data*", "training*",
                                               "benchmarks*"]),
    py_modules=["train", "evaluate"],
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.12",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "numpy>=2.0",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "safetensors>=0.4",  # models/convert_hf.py reads Hugging Face checkpoints (numpy backend)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "tensorboard>=2.16", "pyarrow>=14", "zstandard>=0.22"],
        "data": ["pyarrow>=14", "zstandard>=0.22"],  # data.source=parquet; .zst jsonl shards
        "plots": ["matplotlib>=3.8"],  # benchmarks/experiments.py
        "gcs": ["gcsfs", "google-cloud-storage"],  # gs:// run directories (epath) and TensorBoard events
        "gpu": ["jax[cuda13]>=0.11.2"],
        "tpu": ["jax[tpu]>=0.11.2"],
    },
)
