"""The real shapes of the 15 models, derived from their configs, for parametrizing tests."""

from __future__ import annotations

from mvit3.models import CONFIGS, make_divisible


def stage_sizes(img: int) -> list:
    """Map sizes (H == W) entering layer_3, layer_4, layer_5 for a square img x img input.

    Every stride-2 conv gives ceil(H / 2); v2-style blocks may round odd maps up to even, but
    the sizes seen by the ops are those, so both are covered by odd/even test sizes.
    """
    size = img
    sizes = []
    for _ in range(5):
        size = (size + 1) // 2
        sizes.append(size)
    return sizes[2:]


def v1_attention() -> list:
    """Distinct (d, heads, ffn) of the v1-style transformer layers."""
    return sorted({(s.attn_dim, s.num_heads, s.ffn_dim)
                   for c in CONFIGS.values() if c.style == "v1" for s in c.stages})


def v2_attention() -> list:
    """Distinct (d, ffn) of the v2-style (separable attention) layers."""
    return sorted({(s.attn_dim, s.ffn_dim)
                   for c in CONFIGS.values() if c.style == "v2" for s in c.stages})


def head_dims() -> list:
    return sorted({d // h for d, h, _ in v1_attention()})


def mv2_blocks() -> list:
    """Distinct (in, hidden, out, stride) of every MV2 block."""
    blocks = set()
    for c in CONFIGS.values():
        plan = [(c.stem_channels, c.layer1_channels, 1)]
        plan += [(c.layer1_channels if i == 0 else c.layer2_channels, c.layer2_channels,
                  2 if i == 0 else 1) for i in range(c.layer2_blocks)]
        prev = c.layer2_channels
        for s in c.stages:
            plan.append((prev, s.channels, 2))
            prev = s.channels
        for cin, cout, stride in plan:
            blocks.add((cin, make_divisible(int(round(cin * c.mv2_expand)), 8), cout, stride))
    return sorted(blocks)
