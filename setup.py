from setuptools import find_packages, setup

setup(
    name="megatron_dsv3",
    version="0.1.0",
    description="DeepSeek-V3's training system (MLA, DeepSeekMoE, MTP, FP8, DualPipe) as a Megatron-Core plugin",
    packages=find_packages(include=["megatron_dsv3", "megatron_dsv3.*"]),
    python_requires=">=3.12",
    install_requires=[
        "megatron-core>=0.19.2,<0.20",
        "torch>=2.9",
        "numpy",
        "matplotlib",
        "tqdm",
        "safetensors",  # HF checkpoints (megatron_dsv3.convert)
        "psutil",  # megatron.core.dist_checkpointing's file writers need it
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.3"],
        "tensorboard": ["tensorboard"],  # training metrics also as TensorBoard events
        # test-only references: HF transformers' DeepseekV3; modelopt's block FP8 quantiser
        # and HF importer (it imports requests and huggingface_hub without declaring them)
        "test": ["pytest>=8", "transformers>=5,<6", "nvidia-modelopt==0.47.0", "requests", "huggingface_hub"],
    },
)
