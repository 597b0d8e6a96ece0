"""Test set-up shared by every test module.

Without a CUDA device the Triton kernels are tested in the interpreter on CPU tensors:
TRITON_INTERPRET=1 must be set before triton is first imported, which is why it happens here.
On a GPU machine the interpreter stays off and the same checks run on the GPU (marked `gpu`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

# The devices kernel tests run on: the interpreter on CPU tensors (CI), or the GPU.
KERNEL_DEVICES = [
    pytest.param("cpu", id="interp", marks=pytest.mark.skipif(
        not INTERPRET, reason="TRITON_INTERPRET is off (a GPU is present: the gpu tests cover it)")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA device")]),
]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 means IEEE fp32 in the tests: TF32 off, whatever the machine's default."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
