"""Triton kernels of mvit3, one file per fused op (shipped as `mvit3.kernels`).

Never `import kernels`: PyPI has an unrelated package of that name. Each `<op>.py` holds the
@triton.jit kernel(s), a launcher `<op>(...)` taking tensors with the signature of
`mvit3.ops.reference.<op>`, and `why_unsupported(...)` stating the inputs it cannot take.
"""
