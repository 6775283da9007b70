"""torchvision imports on the CPU-only torch through captioning.vision, and the shim is a no-op
where torch has CUDA. Each case runs in a fresh interpreter: the import can happen only once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def torch_has_cuda() -> bool:
    out = run_python("import torch; print(torch.version.cuda is not None)")
    return out.stdout.strip() == "True"


def test_models_and_transforms_work_through_the_shim() -> None:
    out = run_python(
        """
        from captioning.vision import ensure_torchvision_importable, import_torchvision
        status = ensure_torchvision_importable()
        tv = import_torchvision()
        import torch
        from torchvision.transforms import v2
        model = tv.models.resnet18(weights=None).eval()
        with torch.no_grad():
            y = model(v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(torch.rand(2, 3, 32, 32)))
        assert tuple(y.shape) == (2, 1000), y.shape
        # the real weights enums stay usable (their download is what cannot run here)
        assert tv.models.ResNet101_Weights.IMAGENET1K_V2.url.endswith(".pth")
        print(status, ensure_torchvision_importable())
        """
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split()
    assert first in {"shimmed", "native", "cuda"}
    assert second == "already-imported"


@pytest.mark.skipif(torch_has_cuda(), reason="the CUDA torch imports torchvision natively")
def test_plain_import_fails_without_the_shim_on_this_cpu_torch() -> None:
    """Documents why the shim exists: if this starts passing, torchvision ships a CPU build."""
    out = run_python("import torchvision")
    if out.returncode == 0:
        pytest.skip("this torchvision's compiled ops load on this torch: the shim reports 'native'")
    assert "torchvision::nms does not exist" in out.stderr


def test_noop_when_torch_has_cuda() -> None:
    """With a CUDA torch nothing is defined (simulated by setting torch.version.cuda)."""
    out = run_python(
        """
        import torch
        torch.version.cuda = "13.0"
        from captioning import vision
        assert vision.ensure_torchvision_importable() == "cuda"
        assert vision._LIBRARY is None
        try:
            torch.ops.torchvision.nms
        except (AttributeError, RuntimeError):
            print("untouched")
        else:
            print("defined")
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "untouched"


def test_shim_is_idempotent() -> None:
    out = run_python(
        """
        from captioning import vision
        a = vision.ensure_torchvision_importable()
        b = vision.ensure_torchvision_importable()
        print(a, b)
        """
    )
    assert out.returncode == 0, out.stderr
    a, b = out.stdout.split()
    assert a == b
