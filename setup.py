"""MedPose: distributed training engine for medical-image landmark detection and segmentation.

Library requirements are ranges (a GPU cluster brings its own torch >= 2.4); the exact, tested
environment is pinned in requirements-lock.txt and built by `make venv`.
"""
from setuptools import find_packages, setup

setup(
    name="medpose",
    version="0.1.0",
    description="Distributed training engine for medical-image landmark detection and segmentation",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "kernels*", "models*", "data_pipelines*", "launch*"]),
    package_data={"launch": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "pillow>=9.0",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "numba>=0.58",
        "torch-geometric>=2.4",
        "nibabel>=5.0",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "dali": ["nvidia-dali-cuda130>=2.0"],
        "cv2": ["opencv-python-headless>=4.5"],
        "deepspeed": ["deepspeed>=0.14"],
        "vision": ["torchvision>=0.19", "timm>=1.0"],
        "seg": ["segmentation-models-pytorch>=0.3", "timm>=1.0", "torchvision>=0.19"],
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],   # medpose export, predict --onnx
        "dev": ["pytest>=8", "pytest-benchmark>=5"],
    },
    entry_points={"console_scripts": ["medpose=launch.cli:main"]},
)
