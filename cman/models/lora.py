"""LoRA target modules per HF architecture, and the peft wrapping of a backbone.

transformers 5 names ViT/AST attention `q_proj/k_proj/v_proj/o_proj`, speech SSL models and Whisper's encoder
`q_proj/k_proj/v_proj/out_proj`, RoBERTa keeps `query/key/value`: the table below is the one place that knows it.
A convnet's entry is a function of the model (EfficientNet-Lite: the 1x1 convolutions of its last blocks and head),
since which layers those are depends on how many blocks it has.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from cman.config import LoraSettings
from cman.models.efficientnet import MODEL_TYPE as EFFICIENTNET
from cman.models.efficientnet import efficientnet_lora_targets

logger = logging.getLogger(__name__)

# model_type -> attention projections (or, for a convnet, 1x1 convolutions) that receive adapters.
LORA_TARGETS: dict[str, list[str] | Callable[[nn.Module], list[str]]] = {
    "roberta": ["query", "key", "value"],
    "bert": ["query", "key", "value"],
    "xlm-roberta": ["query", "key", "value"],
    "vit": ["q_proj", "k_proj", "v_proj"],
    "audio-spectrogram-transformer": ["q_proj", "k_proj", "v_proj"],
    "hubert": ["q_proj", "k_proj", "v_proj"],
    "wav2vec2": ["q_proj", "k_proj", "v_proj"],
    "wavlm": ["q_proj", "k_proj", "v_proj"],
    "whisper": ["q_proj", "k_proj", "v_proj"],  # the encoder's self-attention (only the encoder is loaded)
    EFFICIENTNET: efficientnet_lora_targets,  # expand/project convs of the last LORA_LAST_BLOCKS blocks + head conv
}
_FALLBACK_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))


def lora_targets(model: nn.Module, model_type: str, override: list[str] | None = None) -> list[str]:
    """Target module names for `model`: the override, the table entry, or attention names found in the model."""
    if override:
        return list(override)
    if model_type in LORA_TARGETS:
        entry = LORA_TARGETS[model_type]
        return entry(model) if callable(entry) else list(entry)
    leaf_names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    for names in _FALLBACK_NAMES:
        if set(names) <= leaf_names:
            logger.info("model_type %s not in the LoRA table; using attention projections %s", model_type, names)
            return list(names)
    raise ValueError(
        f"no LoRA targets known for model_type {model_type!r}; set peft.target_modules.<modality> "
        f"to some of its Linear layers: {sorted(leaf_names)[:20]}"
    )


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft's PeftModel construction: peft 0.21 (the newest) reads transformers 5's deprecated
    `is_gradient_checkpointing` alias, which warns once per process on every worker and replica. That one
    FutureWarning, raised inside peft, is not ours to act on; everything else still warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(backbone: nn.Module, cfg: LoraSettings, targets: list[str], freeze_base: bool) -> nn.Module:
    """Wrap `backbone` with LoRA adapters on `targets`; base weights stay trainable only if `freeze_base` is false."""
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")
    with peft_wrapping():
        model = get_peft_model(backbone, lora)
    if not freeze_base:
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.requires_grad = True
    return model


def lora_module_count(model: nn.Module) -> int:
    """How many layers of `model` carry a LoRA adapter (0 means the adapters went nowhere)."""
    return sum(1 for _, mod in model.named_modules() if hasattr(mod, "lora_A") and len(mod.lora_A) > 0)


__all__ = ["LORA_TARGETS", "PeftModel", "add_lora", "lora_module_count", "lora_targets"]
