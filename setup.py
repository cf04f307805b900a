"""d2_distill: knowledge distillation for detectron2 detectors (TAR and TBD).

detectron2 itself is deliberately *not* listed: its authors do not publish it on
PyPI, so pip could not resolve it. Install it first (see README: upstream from
GitHub, or `scripts/setup_env.sh`, which repacks the PyPI upload). Its
pure-Python runtime needs are listed here, so an install of detectron2 with
`--no-deps` is complete.
"""
from setuptools import find_packages, setup

setup(
    name="d2_distill",
    version="0.1.0",
    description="Knowledge distillation for detectron2 object detectors: TAR and TBD",
    packages=find_packages(include=["d2_distill", "d2_distill.*"]),
    python_requires=">=3.9",
    install_requires=[
        # needs of d2_distill and of detectron2 (installed without its deps)
        "numpy<2",
        "opencv-python-headless<4.12",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.2",
        "Pillow>=7.1",
        "matplotlib",
        "termcolor>=1.1",
        "yacs>=0.1.8",
        "tabulate",
        "cloudpickle",
        "tqdm>4.29.0",
        "tensorboard",
        "omegaconf>=2.1,<2.4",
        "hydra-core>=1.1",
        "packaging",
        "black",  # detectron2 formats LazyConfig files with it
        "setuptools<81",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout"],
        "onnx": ["onnx"],
    },
)
