"""One modality's encoder: an HF backbone (hub id, local dir or random init) with LoRA, projected to fusion width.

Besides HF models the dispatcher knows one convnet, EfficientNet-Lite (cman.models.efficientnet), whose final feature
map reaches the fusion as tokens like a ViT's patches."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from cman.config import EncoderConfig, LoraSettings
from cman.modality import Modality
from cman.models.efficientnet import MODEL_TYPE as EFFICIENTNET
from cman.models.efficientnet import efficientnet_from_init, is_efficientnet_lite, load_efficientnet_lite
from cman.models.lora import add_lora, lora_targets
from cman.models.stem import add_conv_stem, patch_grid
from cman.models.whisper import MODEL_TYPE as WHISPER
from cman.models.whisper import load_whisper_encoder, whisper_encoder_from_config

logger = logging.getLogger(__name__)

# Fields of a backbone config that must match between a checkpoint's adapters and the base they are loaded onto.
FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "patch_size",
    "image_size",
    "num_mel_bins",
    "max_length",
    "max_source_positions",
)


def fingerprint(config: PretrainedConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in FINGERPRINT_KEYS if getattr(config, k, None) is not None}


_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
_SHA_CACHE: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a file is hashed once per process


def weights_sha256(source: str | None) -> str | None:
    """Content hash of a pretrained base's weight files (a local HF model dir, a hub id in the local HF cache, or one
    weights file such as an EfficientNet-Lite .pth).

    One weight file: its plain sha256 (what `sha256sum model.safetensors` prints); several: sha256 of their sorted
    "name sha256" lines. None when no weight file can be found locally.
    """
    if source is None:
        return None
    directory = Path(source)
    if directory.is_file():
        return _file_sha256(directory)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(source, local_files_only=True, allow_patterns=list(_WEIGHT_PATTERNS)))
        except Exception:  # not downloaded (or not a hub id): nothing to hash
            return None
    files = sorted({f for pattern in _WEIGHT_PATTERNS for f in directory.glob(pattern) if f.is_file()})
    if not files:
        return None
    sums = [_file_sha256(f) for f in files]
    if len(files) == 1:
        return sums[0]
    return hashlib.sha256("".join(f"{f.name} {h}\n" for f, h in zip(files, sums, strict=True)).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def load_backbone(cfg: EncoderConfig, vocab_size: int | None = None, source: str | None = None) -> nn.Module:
    """Load `source` (a saved base) or `cfg.pretrained` with from_pretrained, or build `cfg.init` randomly.

    A Whisper model loads as its encoder alone, its window cut to `cfg.max_seconds` (cman.models.whisper); an
    EfficientNet-Lite directory or .pth as that convnet, batch norm frozen with the base (cman.models.efficientnet)."""
    kwargs = {"attn_implementation": "sdpa"}
    source = source or cfg.pretrained
    if is_efficientnet_lite(source):
        return load_efficientnet_lite(source, freeze_bn=cfg.freeze_base)
    if source is not None and cfg.conv_stem:  # a saved random-init base whose patch projection is a conv stem
        model = AutoModel.from_config(AutoConfig.from_pretrained(source), **kwargs)
        add_conv_stem(model, cfg.conv_stem)
        model.load_state_dict(load_file(str(Path(source, "model.safetensors"))))
        return model
    if source is not None and AutoConfig.from_pretrained(source).model_type == WHISPER:  # its encoder only
        return load_whisper_encoder(source, cfg.max_seconds, **kwargs)
    if source is not None:
        try:
            return AutoModel.from_pretrained(source, **kwargs)
        except ValueError:  # architectures without SDPA support
            return AutoModel.from_pretrained(source)
    init = dict(cfg.init or {})
    model_type = init.pop("model_type")
    if model_type == EFFICIENTNET:
        return efficientnet_from_init(init, freeze_bn=cfg.freeze_base)
    if vocab_size is not None and model_type in ("roberta", "bert", "xlm-roberta"):
        init["vocab_size"] = vocab_size
    config = AutoConfig.for_model(model_type, **init)
    if model_type == WHISPER:
        return whisper_encoder_from_config(config, cfg.max_seconds)
    model = _init_zero_embeddings(AutoModel.from_config(config, **kwargs))
    if cfg.position_init == "sincos":
        _init_sincos_positions(model)
    if cfg.conv_stem:
        add_conv_stem(model, cfg.conv_stem)
    return model


def _init_zero_embeddings(model: nn.Module) -> nn.Module:
    """Random init only: truncated-normal (as ViT) for embedding tokens that HF leaves at zero.

    AST zero-initialises its cls/distillation tokens and position embeddings (harmless for a pretrained model). From
    scratch, the first LayerNorm then sees an all-zero cls vector whose gradient is ~1/sqrt(eps) = 1e6: the audio
    encoder's gradient norm dwarfs the others' and global gradient clipping stops every encoder from learning.
    """
    embeddings = getattr(model, "embeddings", None)
    std = float(getattr(model.config, "initializer_range", 0.02))
    for name in ("cls_token", "distillation_token", "position_embeddings"):
        param = getattr(embeddings, name, None)
        if isinstance(param, nn.Parameter) and not bool(param.detach().any()):
            with torch.no_grad():
                nn.init.trunc_normal_(param, std=std)
    return model


def sincos_table(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(rows * cols, dim) 2-D sine-cosine position table: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"position_init: sincos needs hidden_size divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, dim/2)
        angles = pos[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    return torch.cat([encode(r.flatten()), encode(c.flatten())], dim=1).float()


def _init_sincos_positions(model: nn.Module) -> None:
    """Set the patch positions of a random-init ViT / AST to a 2-D sine-cosine table (the special tokens keep theirs).

    HF initialises them with std initializer_range (0.02), ~20x weaker than a patch's content embedding: measured on
    the demo config, a model learning from scratch then often fails to learn where a shape is (left / middle /
    right wrong for ~half of the test images in two seeds of five).
    """
    param = model.embeddings.position_embeddings  # (1, special + rows * cols, hidden)
    rows, cols = patch_grid(model)
    special = param.shape[1] - rows * cols
    with torch.no_grad():
        param[0, special:] = sincos_table(rows, cols, param.shape[2]).to(param.dtype)


class ModalityEncoder(nn.Module):
    """HF backbone (+ LoRA) → token sequence projected to the fusion width, with a validity mask."""

    def __init__(
        self,
        modality: Modality,
        backbone: nn.Module,
        width: int,
        dropout: float,
        max_tokens: int,
        tokens: str = "sequence",
    ) -> None:
        super().__init__()
        self.tokens = tokens
        self.modality = Modality(modality)
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.proj = nn.Sequential(nn.Linear(hidden, width), nn.LayerNorm(width), nn.Dropout(dropout))
        self.max_tokens = max_tokens

    @property
    def base_config(self) -> PretrainedConfig:
        return self.backbone.config

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return tokens (batch, seq, width) and mask (batch, seq), True where a token is real.

        `features` are the processor's outputs, which are the backbone's keyword arguments (`input_ids` +
        `attention_mask`, `pixel_values`, `input_values` [+ `attention_mask` for waveform models])."""
        out = self.backbone(**features)
        mask = features.get("attention_mask")
        if mask is not None and mask.shape[1] != out.last_hidden_state.shape[1]:  # per sample (waveform models)
            lengths = self._frame_lengths(mask.sum(-1))
            mask = torch.arange(out.last_hidden_state.shape[1], device=lengths.device)[None] < lengths[:, None]
        mask = mask.bool() if mask is not None else None  # (batch, seq)
        hidden = out.last_hidden_state  # (batch, seq, hidden)
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if self.tokens == "mean":  # one token: the masked mean of the last layer (sentence-transformers pooling)
            w = mask.to(hidden.dtype)[..., None]
            hidden = (hidden * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)  # (batch, 1, hidden)
            mask = mask.any(1, keepdim=True)
        tokens = self.proj(hidden)  # (batch, seq, width)
        return _limit_tokens(tokens, mask, self.max_tokens)

    def _frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        base = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return base._get_feat_extract_output_lengths(sample_lengths).long()


def _limit_tokens(tokens: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling of long sequences down to `max_tokens` (first token kept as is)."""
    seq = tokens.shape[1]
    if seq <= max_tokens:
        return tokens, mask
    first, rest, rest_mask = tokens[:, :1], tokens[:, 1:], mask[:, 1:].to(tokens.dtype)
    bins = max_tokens - 1
    summed = nn.functional.adaptive_avg_pool1d((rest * rest_mask[..., None]).transpose(1, 2), bins)  # (b, w, bins)
    counts = nn.functional.adaptive_avg_pool1d(rest_mask[:, None, :], bins)  # (batch, 1, bins)
    pooled = (summed / counts.clamp_min(1e-6)).transpose(1, 2)  # (batch, bins, width)
    pooled_mask = torch.cat([mask[:, :1], counts[:, 0] > 0], dim=1)  # (batch, max_tokens)
    return torch.cat([first, pooled], dim=1), pooled_mask


def build_encoder(
    modality: Modality,
    cfg: EncoderConfig,
    peft: LoraSettings,
    width: int,
    dropout: float,
    max_tokens: int,
    vocab_size: int | None = None,
) -> ModalityEncoder:
    backbone = load_backbone(cfg, vocab_size=vocab_size)
    model_type = backbone.config.model_type
    if peft.enabled:
        override = (peft.target_modules or {}).get(Modality(modality).value)
        targets = lora_targets(backbone, model_type, override)
        backbone = add_lora(backbone, peft, targets, freeze_base=cfg.freeze_base)
    else:
        for param in backbone.parameters():
            param.requires_grad = not cfg.freeze_base
    return ModalityEncoder(modality, backbone, width, dropout, max_tokens, cfg.tokens)
