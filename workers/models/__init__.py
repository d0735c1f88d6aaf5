"""Model runtime: SDXL inpainting loaded once per worker process.

Importing this package does not import torch; loading a model does.
"""

from workers.models.runtime import (
    ModelDirError,
    ModelError,
    ModelOutOfMemory,
    ModelRuntime,
    batch_key,
    check_model_dir,
    denoising_steps,
    get_runtime,
    load_runtime,
    reduced_size,
)

__all__ = [
    "ModelDirError",
    "ModelError",
    "ModelOutOfMemory",
    "ModelRuntime",
    "batch_key",
    "check_model_dir",
    "denoising_steps",
    "get_runtime",
    "load_runtime",
    "reduced_size",
]
