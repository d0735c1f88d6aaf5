"""Image operations. Only this package (and ``workers.models``) may import torch/diffusers."""
