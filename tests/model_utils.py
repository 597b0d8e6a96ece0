"""Helpers for model-level tests: deterministic random weights that exercise every term."""

from __future__ import annotations

import torch
import torch.nn as nn


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and BN buffer with seeded random values, in place.

    Convs and Linears get N(0, 1/fan_in) weights and non-zero biases; norms get affine
    parameters away from (1, 0) and BN running statistics away from (0, 1), so that a
    mistake in any of them (a missing bias, a wrong epsilon, a swapped order) changes the
    output.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(randn(module.weight) / fan_in ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * randn(module.bias))
            elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                module.weight.copy_(1.0 + 0.2 * randn(module.weight))
                module.bias.copy_(0.1 * randn(module.bias))
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.copy_(0.1 * randn(module.running_mean))
                    module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g,
                                                              dtype=torch.float64).to(module.running_var.dtype))
    return model
