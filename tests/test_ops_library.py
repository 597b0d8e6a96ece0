"""The op layer: torch.library registration (schemas, fake and CPU kernels, opcheck),
backend choice and its reasons."""

from __future__ import annotations

import pytest
import torch

import mvit3.ops as ops
from mvit3.ops import backends, library, reference

from conftest import INTERPRET, KERNEL_DEVICES


def sample_args(op: str, dtype=torch.float32, device="cpu", b=2, h=6, w=8):
    """Small but complete argument tuples (every optional input present) for each op."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=g)).to(dtype=dtype, device=device)

    c, d, heads, ffn = 12, 16, 2, 32
    if op == "pointwise_conv":
        return (t(b, d, h, w), t(c, d + 8, scale=0.2), t(c), t(b, 8, h, w), t(b, c, h, w),
                "layer", t(d), t(d), 1e-5, "silu")
    if op == "dwconv_pointwise":
        return (t(b, d, h, w), t(d, 1, 3, 3), t(d), t(c, d, scale=0.2), t(c), 2, None)
    if op == "conv3x3":
        return (t(b, 3, h, w), t(c, 7, 3, 3, scale=0.2), t(c), t(b, 4, h, w), 1, "silu")
    if op == "patch_attention":
        return (t(b, 3 * d, h, w), heads, (d // heads) ** -0.5, t(d, d, scale=0.2), t(d),
                t(b, d, h, w))
    if op == "transformer_mlp":
        return (t(b, d, h, w), "group", t(d), t(d), 1e-5, t(ffn, d, scale=0.2), t(ffn),
                t(d, ffn, scale=0.2), t(d))
    if op == "transformer_mlp_project":
        return (t(b, d, h, w), t(d), t(d), 1e-5, t(ffn, d, scale=0.2), t(ffn),
                t(d, ffn, scale=0.2), t(d), t(d), t(d), 1e-5, t(c, d, scale=0.2), t(c), "silu")
    if op == "separable_attention":
        return (t(b, d, h, w), t(d), t(d), 1e-5, t(1 + 2 * d, d, scale=0.2), t(1 + 2 * d),
                t(d, d, scale=0.2), t(d))
    raise KeyError(op)


def test_both_namespaces_register_every_op_with_the_same_schema():
    for op, schema in library.SCHEMAS.items():
        for namespace in (library.CUDA_NAMESPACE, library.TRITON_NAMESPACE):
            registered = str(getattr(getattr(torch.ops, namespace), op).default._schema)
            assert registered == f"{namespace}::{op}{schema}"
    assert set(library.OPS) == {"pointwise_conv", "dwconv_pointwise", "conv3x3", "patch_attention",
                                "transformer_mlp", "transformer_mlp_project", "separable_attention"}


def test_the_schema_file_is_read_line_by_line(tmp_path):
    """schemas.def, the one source of the schemas (csrc/ops.cpp includes it as an X-macro):
    comments and blank lines are skipped, any other line must be one MVIT3_OP(...)."""
    path = tmp_path / "schemas.def"
    path.write_text('// a comment\n\nMVIT3_OP(op_a, "(Tensor x, int n=1)", "(Tensor, Tensor)")\n')
    assert library.read_schemas(path) == {"op_a": "(Tensor x, int n=1) -> (Tensor, Tensor)"}
    path.write_text('MVIT3_OP(op_a, "(Tensor x)", "Tensor")\nMVIT3_OP(op_b, "(Tensor x)")\n')
    with pytest.raises(ValueError, match="schemas.def:2: expected MVIT3_OP"):
        library.read_schemas(path)


@pytest.mark.parametrize("op", library.OPS)
def test_every_op_has_its_three_implementations(op):
    import importlib
    from pathlib import Path

    assert callable(getattr(reference, op))
    assert callable(getattr(importlib.import_module(f"mvit3.kernels.{op}"), op))
    csrc = Path(__file__).resolve().parents[1] / "csrc" / f"{op}.cu"
    assert csrc.is_file(), f"{csrc} is missing"


@pytest.mark.parametrize("op", library.OPS)
def test_opcheck_cuda_namespace_on_cpu(op):
    """mvit3::<op>: schema, fake (meta) kernel vs the CPU kernel, and its registrations."""
    torch.library.opcheck(getattr(torch.ops.mvit3, op).default, sample_args(op))


@pytest.mark.parametrize("op", library.OPS)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_opcheck_triton_namespace(op, device):
    """mvit3_triton::<op>: with TRITON_INTERPRET=1 its CPU kernel is the Triton kernel."""
    torch.library.opcheck(getattr(torch.ops.mvit3_triton, op).default, sample_args(op, device=device))


@pytest.mark.parametrize("op", library.OPS)
def test_fake_outputs_are_channels_last_like_the_kernels(op):
    args = sample_args(op)
    real = getattr(reference, op)(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = getattr(torch.ops.mvit3_triton, op)(*fake_args)
    if isinstance(real, torch.Tensor):  # one output; transformer_mlp_project has two
        real, fake = (real,), (fake,)
    assert [(f.shape, f.stride()) for f in fake] == [(r.shape, r.stride()) for r in real]


def test_explicit_backends_state_why_they_cannot_run():
    args = sample_args("patch_attention", dtype=torch.float64)
    with pytest.raises(ops.BackendUnavailable, match="cannot run patch_attention: dtype torch.float64"):
        ops.patch_attention(*args, backend="triton")
    # not built, or built: the CPU input is refused either way, with the reason
    with pytest.raises(ops.BackendUnavailable,
                       match="backend 'cuda' cannot run patch_attention: (CUDA library|input is on cpu)"):
        ops.patch_attention(*args, backend="cuda")
    assert backends.select("patch_attention", "auto", args) == "torch"
    mixed = list(sample_args("pointwise_conv"))
    mixed[1] = mixed[1].double()
    reason = backends.why_not("triton", "pointwise_conv", tuple(mixed))
    assert reason is not None and "mixed dtypes" in reason


@pytest.mark.skipif(not INTERPRET, reason="the CPU choice of 'auto' is checked in the interpreter set-up")
def test_auto_on_cpu_is_torch_and_triton_runs_in_the_interpreter():
    args = sample_args("transformer_mlp")
    assert backends.select("transformer_mlp", "auto", args) == "torch"
    assert backends.select("transformer_mlp", "triton", args) == "triton"


def test_env_override_and_validation(monkeypatch):
    monkeypatch.setenv("MVIT3_BACKEND", "torch")
    assert ops.requested_backend("triton") == "torch"
    monkeypatch.delenv("MVIT3_BACKEND")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.requested_backend("tensorrt")
    with pytest.raises(KeyError, match="unknown op"):
        backends.select("flash_attention", "auto", ())


def test_availability_table_has_a_row_and_reason_per_backend():
    rows = ops.availability()
    assert [r[0] for r in rows] == ["torch", "triton", "cuda"]
    assert all(isinstance(ok, bool) and reason for _, ok, reason in rows)


@pytest.mark.parametrize("op", library.OPS)
def test_reference_ops_give_channels_last_outputs(op):
    out = getattr(reference, op)(*sample_args(op))
    for output in (out,) if isinstance(out, torch.Tensor) else out:
        assert output.is_contiguous(memory_format=torch.channels_last)


def test_tf32_setting_is_read_through_either_torch_api():
    """fp32 kernels use TF32 only when the user allowed it, through the legacy flag or the
    fp32_precision API; after the latter set "tf32", reading the legacy flag raises in torch."""
    from mvit3.kernels._common import tf32_allowed

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    try:
        assert tf32_allowed() is False  # the tests run with TF32 off (conftest)
        matmul.fp32_precision = "tf32"
        assert tf32_allowed() is True
        matmul.fp32_precision = "ieee"
        assert tf32_allowed() is False
        matmul.fp32_precision = "none"  # back to the legacy flag
        matmul.allow_tf32 = True
        assert tf32_allowed() is True
    finally:
        matmul.fp32_precision = "none"
        matmul.allow_tf32 = False
