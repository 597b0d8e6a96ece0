"""The 15 MobileViT variants as data.

Every number here comes from the official configurations (cvnets v0.1 `config/mobilevit.py`
with the MobileViTv3 overlay for v1 and v1-style v3; cvnets v0.2 `config/mobilevit_v2.py` and
the overlay's `config/mobilevit_v3.py` for v2 and v2-style v3). `docs/architecture.md` and the
shared reference spec give the sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """cvnets/MobileNet rounding: nearest multiple of `divisor` (ties up), never below 90%."""
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class PreprocessConfig:
    """How images must be prepared for the official weights (spec section 7).

    Inputs are pixel / 255 in [0, 1] with no mean/std normalisation. `channel_order` is the
    order of the three input channels the weights were trained with: cvnets v0.1 read images
    with OpenCV (BGR), cvnets v0.2 with PIL (RGB).
    """

    channel_order: Literal["BGR", "RGB"]
    interpolation: Literal["bilinear", "bicubic"]
    resize: int = 288  # shorter side, keeping the aspect ratio
    crop: int = 256  # centre crop
    scale: float = 1.0 / 255.0
    mean: Optional[tuple] = None
    std: Optional[tuple] = None


# v1 / v1-style v3 weights come from cvnets v0.1 (OpenCV, cv2 bilinear resize).
PREPROCESS_CVNETS_V01 = PreprocessConfig(channel_order="BGR", interpolation="bilinear")
# v2 / v2-style v3 weights come from cvnets v0.2 (PIL, bicubic resize).
PREPROCESS_CVNETS_V02 = PreprocessConfig(channel_order="RGB", interpolation="bicubic")


@dataclass(frozen=True)
class AttentionStage:
    """layer_3 / layer_4 / layer_5: an MV2 block with stride 2, then one MobileViT block."""

    channels: int  # C: output of the MV2 block and of the MobileViT block
    attn_dim: int  # d: transformer width
    ffn_dim: int  # transformer FFN hidden width
    num_layers: int  # L: transformer layers inside the MobileViT block
    num_heads: int = 4  # MHSA heads (v1-style only; the separable attention has none)

    @property
    def head_dim(self) -> int:
        return self.attn_dim // self.num_heads


@dataclass(frozen=True)
class MobileViTConfig:
    name: str
    version: Literal["v1", "v2", "v3"]
    # Block family: "v1" = MHSA transformer on [B*P, N, d] tokens with LayerNorm (v1 and
    # v3 XXS/XS/S); "v2" = separable linear attention on [B, d, P, N] with GroupNorm(1)
    # (v2 and v3 0.5/0.75/1.0).
    style: Literal["v1", "v2"]
    official_name: str  # name of the official key listing / config mode
    stem_channels: int
    mv2_expand: int  # expand ratio of every MV2 block
    layer1_channels: int  # layer_1: one MV2 block, stride 1
    layer2_channels: int  # layer_2: MV2 blocks with strides 2, 1, ...
    layer2_blocks: int
    stages: tuple  # three AttentionStage for layer_3, layer_4, layer_5
    exp_channels: Optional[int]  # conv_1x1_exp width; None where it is an Identity (v2 style)
    classifier_dropout: float  # 0 where the head has no dropout (v2 style)
    dropout: float  # `mit.dropout`: after attention and after the FFN
    attn_dropout: float
    ffn_dropout: float
    preprocess: PreprocessConfig

    @property
    def num_features(self) -> int:
        return self.exp_channels if self.exp_channels is not None else self.stages[-1].channels


def _v1_style(name, version, official_name, *, expand, l1, l2, stages, dropout):
    c5 = stages[-1].channels
    return MobileViTConfig(
        name=name,
        version=version,
        style="v1",
        official_name=official_name,
        stem_channels=16,
        mv2_expand=expand,
        layer1_channels=l1,
        layer2_channels=l2,
        layer2_blocks=3,
        stages=tuple(stages),
        exp_channels=min(4 * c5, 960),
        classifier_dropout=0.1,
        dropout=dropout,
        attn_dropout=0.0,
        ffn_dropout=0.0,
        preprocess=PREPROCESS_CVNETS_V01,
    )


def _v2_style(name, version, official_name, width):
    """The width-multiplier rules of cvnets v0.2 `config/mobilevit_v2.py` (identical in v3)."""

    def stage(channels, attn, layers):
        d = make_divisible(attn * width, 8)
        ffn = int(2 * d // 16 * 16)  # ffn_multiplier 2, floored to a multiple of 16
        return AttentionStage(make_divisible(channels * width, 8), d, ffn, layers, num_heads=1)

    return MobileViTConfig(
        name=name,
        version=version,
        style="v2",
        official_name=official_name,
        stem_channels=int(make_divisible(min(max(32 * width, 16), 64), 8, min_value=16)),
        mv2_expand=2,
        layer1_channels=int(make_divisible(64 * width, divisor=16)),
        layer2_channels=make_divisible(128 * width, 8),
        layer2_blocks=2,
        stages=(stage(256, 128, 2), stage(384, 192, 4), stage(512, 256, 3)),
        exp_channels=None,
        classifier_dropout=0.0,
        dropout=0.0,
        attn_dropout=0.0,
        ffn_dropout=0.0,
        preprocess=PREPROCESS_CVNETS_V02,
    )


S = AttentionStage

CONFIGS = {
    cfg.name: cfg
    for cfg in [
        # MobileViTv3, v1-style (C / d / ffn / L per stage; spec section 2.1)
        _v1_style("mobilevitv3_xxs", "v3", "mobilevitv3_xxs", expand=2, l1=16, l2=24, dropout=0.05,
                  stages=[S(64, 64, 128, 2), S(80, 80, 160, 4), S(128, 96, 192, 3)]),
        _v1_style("mobilevitv3_xs", "v3", "mobilevitv3_xs", expand=4, l1=32, l2=48, dropout=0.1,
                  stages=[S(96, 96, 192, 2), S(160, 120, 240, 4), S(160, 144, 288, 3)]),
        _v1_style("mobilevitv3_s", "v3", "mobilevitv3_s", expand=4, l1=32, l2=64, dropout=0.1,
                  stages=[S(128, 144, 288, 2), S(256, 192, 384, 4), S(320, 240, 480, 3)]),
        # The paper's "2 blocks" latency variants: 2 transformer layers in layer_4.
        _v1_style("mobilevitv3_xxs_l2", "v3", "mobilevitv3_xxs_l2", expand=2, l1=16, l2=24, dropout=0.05,
                  stages=[S(64, 64, 128, 2), S(80, 80, 160, 2), S(128, 96, 192, 3)]),
        _v1_style("mobilevitv3_xs_l2", "v3", "mobilevitv3_xs_l2", expand=4, l1=32, l2=48, dropout=0.1,
                  stages=[S(96, 96, 192, 2), S(160, 120, 240, 2), S(160, 144, 288, 3)]),
        _v1_style("mobilevitv3_s_l2", "v3", "mobilevitv3_s_l2", expand=4, l1=32, l2=64, dropout=0.1,
                  stages=[S(128, 144, 288, 2), S(256, 192, 384, 2), S(320, 240, 480, 3)]),
        # MobileViTv3, v2-style
        _v2_style("mobilevitv3_050", "v3", "mobilevitv3_0.5", 0.5),
        _v2_style("mobilevitv3_075", "v3", "mobilevitv3_0.75", 0.75),
        _v2_style("mobilevitv3_100", "v3", "mobilevitv3_1.0", 1.0),
        # MobileViTv1 (cvnets v0.1)
        _v1_style("mobilevit_xxs", "v1", "mobilevitv1_xxs", expand=2, l1=16, l2=24, dropout=0.05,
                  stages=[S(48, 64, 128, 2), S(64, 80, 160, 4), S(80, 96, 192, 3)]),
        _v1_style("mobilevit_xs", "v1", "mobilevitv1_xs", expand=4, l1=32, l2=48, dropout=0.1,
                  stages=[S(64, 96, 192, 2), S(80, 120, 240, 4), S(96, 144, 288, 3)]),
        _v1_style("mobilevit_s", "v1", "mobilevitv1_s", expand=4, l1=32, l2=64, dropout=0.1,
                  stages=[S(96, 144, 288, 2), S(128, 192, 384, 4), S(160, 240, 480, 3)]),
        # MobileViTv2 (cvnets v0.2)
        _v2_style("mobilevitv2_050", "v2", "mobilevitv2_0.5", 0.5),
        _v2_style("mobilevitv2_075", "v2", "mobilevitv2_0.75", 0.75),
        _v2_style("mobilevitv2_100", "v2", "mobilevitv2_1.0", 1.0),
    ]
}
