"""Install megatron_vpmoe and the `vpmoe` command.

On CPU hosts install ``torch==2.13.0`` first (``make install`` does): an unpinned torch
pulls a multi-GB CUDA build. GPU clusters bring their own CUDA torch and add ``[gpu]``.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_vpmoe",
    version="0.1.0",
    description="Megatron-style pretraining and distillation stack for VPMoE, a deep sparse MoE LM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and launch/templates/ stay top-level folders of the checkout; the package reaches them
    # through links (megatron_vpmoe/kernels/X.py -> ../../kernels/X.py, megatron_vpmoe/launch/templates
    # -> ../../launch/templates), so they install as megatron_vpmoe.kernels and package data. kernels/
    # has no __init__.py: a Python started in the checkout root must import Hugging Face's `kernels`.
    packages=find_packages(include=["megatron_vpmoe", "megatron_vpmoe.*"]),
    package_data={
        "megatron_vpmoe.plan": ["gpus/*.yaml"],
        "megatron_vpmoe.launch": ["templates/*.sbatch"],
        "megatron_vpmoe.data": ["default/*.md", "default/*/*.txt", "default/*/*.jsonl", "default/*/*/*.jsonl"],
    },
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.17",
        "numpy>=1.26",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "gigatoken-cachefix>=0.10.1",  # the fast encoding engine (bounded encode caches); checked per tokenizer
        "sentencepiece>=0.2",
        "tiktoken>=0.8",
        "openai-harmony>=0.0.4",
        "transformers>=4.46",
        "tqdm>=4.66",
        "rich>=13",
        "zstandard>=0.22",
        "pyarrow>=15",
        "aiohttp>=3.9",
        "matplotlib>=3.8",
        "tensorboard>=2.15",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "gpu": ["triton>=3.0", "transformer-engine[pytorch]>=1.10"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "triton>=3.0", "mpi4py>=3.1", "lm-eval>=0.4", "accelerate>=1.0",
                "transformers[serving]>=4.46"],  # `transformers serve`: the third-party teacher server in tests
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["vpmoe=megatron_vpmoe.cli:main"]},
)
