"""jfl: JanusFlow (arXiv 2411.07975) in JAX/Flax: inference, training, weight conversion."""

import setuptools

setuptools.setup(
    name="jfl",
    version="0.1.0",
    description="JanusFlow in JAX/Flax: faithful port, converter, sampler, trainer",
    packages=setuptools.find_packages(include=["jfl", "jfl.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.12", "flax>=0.12,<0.14", "optax>=0.2.5", "orbax-checkpoint>=0.11",
        "chex>=0.1.90", "ml-collections>=1.0", "grain>=0.2.12", "tensorflow-datasets>=4.9",
        "transformers>=4.46", "tokenizers>=0.20", "safetensors>=0.4", "numpy>=1.26",
        "pillow>=10", "tqdm>=4.66", "tensorboardX>=2.6", "matplotlib>=3.8",
    ],
    extras_require={"parquet": ["pyarrow>=14"]},
    entry_points={"console_scripts": [
        "jfl-convert=jfl.cli.convert:main",
        "jfl-export=jfl.cli.convert:export_main",
        "jfl-train=jfl.cli.train:main",
        "jfl-generate=jfl.cli.generate:main",
        "jfl-chat=jfl.cli.chat:main",
        "jfl-demo=jfl.demo.run:main",
        "jfl-prepare=jfl.cli.prepare:main",
        "jfl-cache-latents=jfl.cli.cache_latents:main",
    ]},
)
