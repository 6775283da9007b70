"""The one door to torchvision: makes ``import torchvision`` work on the CPU-only torch.

The torchvision 0.28.0 wheel on the package index is a CUDA build. With the CPU torch its compiled
extension (``torchvision/_C.so``) cannot load, and the import then dies in
``torchvision/_meta_registrations.py`` with ``operator torchvision::nms does not exist``, because
that module registers fake kernels for ops the missing extension would have defined. Models and
transforms are pure Python and work once the import succeeds, so, only when the extension cannot
load, we define the two operator *schemas* it would have defined (no kernels: ``ops.nms`` and
``torchvision.io.decode_*`` stay unavailable; images are decoded with Pillow, as WebDataset does).

Where torch has CUDA (the matching CUDA wheels) or the extension loads (a CPU build of
torchvision), this is a no-op. Use ``import_torchvision()`` instead of ``import torchvision``::

    from captioning.vision import import_torchvision
    torchvision = import_torchvision()
    model = torchvision.models.resnet18(weights=None)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

ShimStatus = Literal["already-imported", "cuda", "native", "shimmed"]

# The torch.library handle must outlive this call: dropping it would unregister the schemas.
_LIBRARY: Any = None

_MISSING_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _extension_path() -> Path | None:
    """torchvision's compiled ops library, found without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    candidates = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    return candidates[0] if candidates else None


def ensure_torchvision_importable() -> ShimStatus:
    """Make the next ``import torchvision`` succeed; say what was needed.

    Returns ``"already-imported"`` (nothing to do), ``"cuda"`` (torch has CUDA: the wheel's ops load
    as built, so nothing is touched), ``"native"`` (the compiled extension loaded), or ``"shimmed"``
    (the extension cannot load on this CPU torch; the missing op schemas were defined).
    """
    global _LIBRARY
    if "torchvision" in sys.modules:
        return "already-imported"
    import torch

    if torch.version.cuda is not None:
        return "cuda"
    path = _extension_path()
    if path is not None:
        try:
            torch.ops.load_library(str(path))
            return "native"
        except (OSError, RuntimeError):
            pass  # a CUDA build of the extension on a CPU torch: fall through to the schemas
    if _LIBRARY is None:
        library = torch.library.Library("torchvision", "DEF")
        for schema in _MISSING_SCHEMAS:
            library.define(schema)
        _LIBRARY = library
    return "shimmed"


def import_torchvision() -> ModuleType:
    """``import torchvision``, made to work on the CPU-only torch (see the module doc)."""
    ensure_torchvision_importable()
    import torchvision

    return torchvision
