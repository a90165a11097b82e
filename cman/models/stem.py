"""Patch grids of random-init ViT / AST backbones, and a convolutional front-end for them.

A transformer learning from scratch on a few thousand clips or images gets one linear projection per patch (a
16×16 convolution with a 16×16 stride, say) and nothing else that is local: it must learn from the data what small
shifts in time or frequency leave unchanged. A stack of 3×3 stride-2 convolutions in place of that projection
("early convolutions", Xiao et al., 2021) brings that prior and keeps the patch grid, hence the position embeddings
and everything after them. Measured on the spoken digits with an unseen speaker: see configs/digits.yaml.
"""

from __future__ import annotations

from torch import nn


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, columns) of a ViT's or AST's patch grid."""
    config = model.config
    if config.model_type == "vit":
        side = config.image_size // config.patch_size
        return side, side
    return model.embeddings.get_shape(config)  # AST: (frequency patches, time patches)


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, rows, columns) that the patch projection sees."""
    config = model.config
    if config.model_type == "vit":
        return config.num_channels, config.image_size, config.image_size
    return 1, config.num_mel_bins, config.max_length  # AST transposes its (frames, bins) input to (1, bins, frames)


class ConvStem(nn.Sequential):
    """The convolutions in order. `weight` is the first one's: ViT reads `projection.weight.dtype` to cast its input."""

    @property
    def weight(self) -> nn.Parameter:
        return self[0].weight


def conv_stem(channels: int, size: tuple[int, int], grid: tuple[int, int], widths: list[int], hidden: int) -> ConvStem:
    """3×3 convolutions (BatchNorm, ReLU), each halving rows/columns while they stay at least twice the grid, then
    one convolution to `hidden` channels whose kernel and stride land exactly on the `grid`."""
    layers: list[nn.Module] = []
    rows, cols = size
    for width in widths:
        stride = (2 if rows // 2 >= grid[0] else 1, 2 if cols // 2 >= grid[1] else 1)
        layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        rows, cols = -(-rows // stride[0]), -(-cols // stride[1])  # ceil: padding 1, kernel 3
        channels = width
    stride = (max(1, rows // grid[0]), max(1, cols // grid[1]))
    kernel = (rows - (grid[0] - 1) * stride[0], cols - (grid[1] - 1) * stride[1])
    layers.append(nn.Conv2d(channels, hidden, kernel, stride=stride))
    return ConvStem(*layers)


def add_conv_stem(model: nn.Module, widths: list[int]) -> None:
    """Replace a ViT's / AST's patch projection by `conv_stem` with these widths (same output grid and width)."""
    channels, rows, cols = _input_shape(model)
    grid = patch_grid(model)
    model.embeddings.patch_embeddings.projection = conv_stem(
        channels, (rows, cols), grid, list(widths), model.config.hidden_size
    )


def has_conv_stem(model: nn.Module) -> bool:
    patches = getattr(getattr(model, "embeddings", None), "patch_embeddings", None)
    return isinstance(getattr(patches, "projection", None), ConvStem)
