"""The ``ghost_mannequin`` operation: segmentation, inner garment reconstruction, compositing.

Classical stages (no model weights) live here; generation goes through the
:class:`~workers.pipelines.contracts.Inpainter` seam.
"""

from workers.pipelines.ghost.pipeline import (
    GhostJob,
    GhostParams,
    GhostResult,
    finish_ghost,
    ghost_mannequin,
    prepare_ghost,
)

__all__ = [
    "GhostJob",
    "GhostParams",
    "GhostResult",
    "finish_ghost",
    "ghost_mannequin",
    "prepare_ghost",
]
