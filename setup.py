"""fusec: a dataflow-graph compiler with kernel fusion for PyTorch."""
from setuptools import find_packages, setup

setup(
    name="fusec",
    version="0.1.0",
    description="Dataflow-graph compiler with kernel fusion for PyTorch (RDU-style, Numba CPU backend)",
    # passes/ and backends/ are top-level folders of the repository, installed inside the package
    packages=find_packages(include=["fusec", "fusec.*"]) + [
        f"fusec.{p}" for p in find_packages(include=["passes", "passes.*", "backends", "backends.*"])],
    package_dir={"fusec.passes": "passes", "fusec.backends": "backends"},
    python_requires=">=3.11",  # tomllib (machine files); tested on 3.11
    # onednn-cpu-gomp: oneDNN's matmul runs the prefill GEMM blocks (backends/numba_cpu/onednn.py); MKL
    # runs them where it is missing
    install_requires=["torch>=2.6", "numpy", "numba", "llvmlite", "scipy",
                      "onednn-cpu-gomp==2023.2.0; platform_machine == 'x86_64' and sys_platform == 'linux'"],
    # models: the checkpoint formats of `fusec generate` (fusec/loaders imports them only when used)
    # pytest-xdist: `make test` runs two test processes (Makefile)
    extras_require={"test": ["pytest", "pytest-xdist==3.8.0", "hypothesis", "transformers==4.57.6", "matplotlib",
                             "ray==2.60.0", "safetensors", "tokenizers", "gguf==0.19.0"],
                    "models": ["safetensors", "tokenizers", "gguf>=0.19"],
                    "bench": ["matplotlib"], "ray": ["ray==2.60.0"]},
    entry_points={"console_scripts": ["fusec = fusec.cli:main"],
                  # torch.compile(model, backend="fusec") finds the backend here, without importing fusec
                  "torch_dynamo_backends": ["fusec = fusec.dynamo:fusec_backend"]},
)
