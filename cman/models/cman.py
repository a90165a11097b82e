"""The CMAN model: per-modality encoders + shared fusion transformer; save_pretrained / from_pretrained."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from cman.config import CMANConfig, from_dict
from cman.data.processors import Processor, build_processor, load_processor
from cman.modality import Modality
from cman.models.encoders import ModalityEncoder, build_encoder, fingerprint, load_backbone, weights_sha256
from cman.models.fusion import FusionTransformer
from cman.models.lora import peft_wrapping
from cman.models.stem import has_conv_stem

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cman-checkpoint/1"
Features = dict[str, torch.Tensor]


class CMAN(nn.Module):
    """Encoders (ModuleDict keyed by modality) → fusion transformer → 512-d L2-normalised embeddings."""

    def __init__(self, config: CMANConfig, encoders: dict[Modality, ModalityEncoder], processors: dict) -> None:
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict({Modality(m).value: enc for m, enc in encoders.items()})
        mc = config.model
        self.fusion = FusionTransformer(mc.fusion, mc.embedding_dim, mc.dropout)
        self.processors: dict[Modality, Processor] = dict(processors)

    @property
    def modalities(self) -> list[Modality]:
        return [Modality(m) for m in self.encoders]

    def encode_tokens(self, modality: Modality, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """One modality's fusion-width tokens (batch, seq, width) and mask (batch, seq) (the tensor path)."""
        return self.encoders[Modality(modality).value](features)

    def fuse(self, streams: dict[Modality, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return self.fusion(streams)  # (batch, embedding_dim)

    def embed_features(self, inputs: dict[Modality, Features]) -> torch.Tensor:
        """A composed embedding of all modalities in `inputs` (same batch size each). # (batch, embedding_dim)"""
        return self.fuse({Modality(m): self.encode_tokens(m, feats) for m, feats in inputs.items()})

    def embed(self, text: Any = None, audio: Any = None, image: Any = None, **kwargs: Any) -> Any:
        """L2-normalised numpy embedding(s) of raw text / audio / image (any non-empty subset); see `cman.api.embed`."""
        from cman.api import embed

        return embed(self, text=text, audio=audio, image=image, **kwargs)

    # ---- sentence-transformers-style encoding of raw inputs (cman.embedding.encode) -----------------------------
    def encode_text(
        self,
        texts: str | list[str],
        batch_size: int = 32,
        normalize_embeddings: bool = True,
        convert_to_tensor: bool = False,
        show_progress_bar: bool = False,
        device: str | torch.device | None = None,
    ) -> Any:
        """Embeddings of texts with sentence-transformers' keywords: a string → (dim,), a list → (n, dim); numpy, or
        a tensor on the model's device with `convert_to_tensor`; `device` moves the model there first."""
        from cman.embedding import encode

        options = {"normalize_embeddings": normalize_embeddings, "convert_to_tensor": convert_to_tensor}
        kwargs = {"batch_size": batch_size, "show_progress_bar": show_progress_bar, "device": device, **options}
        return encode(self, Modality.TEXT, texts, **kwargs)

    def encode_audio(
        self,
        audio: Any,
        batch_size: int = 32,
        normalize_embeddings: bool = True,
        convert_to_tensor: bool = False,
        show_progress_bar: bool = False,
        device: str | torch.device | None = None,
        sample_rate: int | None = None,
    ) -> Any:
        """Embeddings of audio: a path, encoded bytes (WAV/FLAC/OGG/MP3) or a 1-D float waveform with `sample_rate`;
        a list of them → (n, dim). Keywords as `encode_text`."""
        from cman.embedding import encode

        options = {"normalize_embeddings": normalize_embeddings, "convert_to_tensor": convert_to_tensor}
        kwargs = {"batch_size": batch_size, "show_progress_bar": show_progress_bar, "device": device, **options}
        return encode(self, Modality.AUDIO, audio, sample_rate=sample_rate, **kwargs)

    def encode_image(
        self,
        images: Any,
        batch_size: int = 32,
        normalize_embeddings: bool = True,
        convert_to_tensor: bool = False,
        show_progress_bar: bool = False,
        device: str | torch.device | None = None,
    ) -> Any:
        """Embeddings of images: a path, encoded bytes or a PIL image; a list → (n, dim). Keywords as `encode_text`."""
        from cman.embedding import encode

        options = {"normalize_embeddings": normalize_embeddings, "convert_to_tensor": convert_to_tensor}
        kwargs = {"batch_size": batch_size, "show_progress_bar": show_progress_bar, "device": device, **options}
        return encode(self, Modality.IMAGE, images, **kwargs)

    def encode(self, sentences: str | list[str], *args: Any, **kwargs: Any) -> Any:
        """`encode_text` under sentence-transformers' name: `model.encode("a dog on a beach")` → (dim,) numpy.
        (The tensor method once called `encode(modality, features)` is `encode_tokens`.)"""
        if isinstance(sentences, Modality) and args and isinstance(args[0], dict):
            raise TypeError(
                "CMAN.encode(modality, features) is now CMAN.encode_tokens(modality, features); encode() embeds "
                "texts like sentence-transformers (see also encode_audio, encode_image)"
            )
        return self.encode_text(sentences, *args, **kwargs)

    def forward(self, inputs: dict[Modality, Features]) -> dict[Modality, torch.Tensor]:
        """Each modality embedded on its own: modality → (batch_m, embedding_dim)."""
        return {Modality(m): self.fuse({Modality(m): self.encode_tokens(m, feats)}) for m, feats in inputs.items()}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for enc in self.encoders.values():
            base = _base_model(enc.backbone)
            # transformers >= 5.2x renamed gradient_* to activation_* (the old names warn); use what this one has
            renamed = hasattr(base, "activation_checkpointing_enable")
            if enabled and getattr(base, "supports_gradient_checkpointing", False):
                if renamed:
                    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            elif not enabled and renamed and base.is_activation_checkpointing:
                base.activation_checkpointing_disable()
            elif not enabled and not renamed and getattr(base, "is_gradient_checkpointing", False):
                base.gradient_checkpointing_disable()

    def merge_adapters(self) -> CMAN:
        """Fold LoRA into the base weights (for inference); outputs are unchanged."""
        for enc in self.encoders.values():
            if isinstance(enc.backbone, PeftModel):
                enc.backbone = enc.backbone.merge_and_unload()
        return self

    def parameter_report(self) -> dict[str, dict[str, int]]:
        """Per encoder: trainable / total parameters, and how many of each are base weights vs LoRA adapters."""
        report = {}
        for name, enc in self.encoders.items():
            params = list(enc.backbone.named_parameters())
            lora = [p for n, p in params if "lora_" in n]
            base = [p for n, p in params if "lora_" not in n]
            head = list(enc.proj.parameters())
            report[name] = {
                "trainable": sum(p.numel() for p in enc.parameters() if p.requires_grad),
                "total": sum(p.numel() for p in enc.parameters()),
                "base_total": sum(p.numel() for p in base),
                "base_trainable": sum(p.numel() for p in base if p.requires_grad),
                "adapter_trainable": sum(p.numel() for p in lora if p.requires_grad),
                "projection": sum(p.numel() for p in head),
            }
        return report

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        directory: str | Path,
        metadata: dict[str, Any] | None = None,
        extra_files: Callable[[Path], None] | None = None,
        include_bases: bool = False,
    ) -> Path:
        """Write config.yaml, metadata.json, adapters/weights (safetensors) and processors; atomic per directory.

        `extra_files(tmp_dir)` may add files (e.g. optimiser state) before the directory is swapped in.
        `include_bases=True` also stores frozen pretrained bases, so the checkpoint loads without the hub or its cache
        (a self-contained deployment); by default a frozen hub base is referenced by id + fingerprint only.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self._write(tmp, metadata or {}, include_bases)
            if extra_files is not None:
                extra_files(tmp)
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    def _write(self, out: Path, metadata: dict[str, Any], include_bases: bool = False) -> None:
        self.config.save(out / "config.yaml")
        bases = {}
        for name, enc in self.encoders.items():
            mod_dir = out / "encoders" / name
            ecfg = self.config.model.encoder(Modality(name))
            saves_base = ecfg.init is not None or not ecfg.freeze_base or include_bases
            if isinstance(enc.backbone, PeftModel):
                enc.backbone.save_pretrained(mod_dir / "adapter")
            if saves_base or not isinstance(enc.backbone, PeftModel):
                _save_base(enc.backbone, mod_dir / "base")
            self.processors[Modality(name)].save(mod_dir / "processor")
            saved = saves_base or not isinstance(enc.backbone, PeftModel)
            bases[name] = {
                "source": ecfg.pretrained or "random-init",
                "saved_base": saved,
                "fingerprint": fingerprint(enc.base_config),
            }
            if not saved:  # a frozen pretrained base is not copied: its identity is (path, content hash)
                bases[name]["weights_sha256"] = weights_sha256(ecfg.pretrained)
        heads = {k: v.detach().contiguous() for k, v in self.state_dict().items() if ".backbone." not in k}
        save_file(heads, str(out / "heads.safetensors"))
        trainable, total = count_parameters(self)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "modalities": [m.value for m in self.modalities],
            "base_models": bases,
            "parameters": {"trainable": trainable, "total": total, "encoders": self.parameter_report()},
            **metadata,
        }
        (out / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, trainable: bool = False, modalities: Iterable[Modality | str] | None = None
    ) -> CMAN:
        """Load a checkpoint written by `save_pretrained` (a directory, or an MLflow URI such as
        `models:/cman@champion` / `runs:/<id>/model`, resolved by `cman.api.resolve_checkpoint`).

        `modalities` loads only those encoders (backbone, adapters, processor) besides the fusion transformer:
        a Serve encoder replica loads its own, the Retriever loads `[]` (fusion + projections only).
        """
        from cman.api import is_model_uri, resolve_checkpoint

        directory = resolve_checkpoint(directory) if is_model_uri(directory) else Path(directory)
        if not (directory / "metadata.json").is_file() and (directory / "MLmodel").is_file():
            directory = resolve_checkpoint(directory)  # an MLflow model directory holding a checkpoint
        meta_path = directory / "metadata.json"
        if not meta_path.is_file() or not (directory / "config.yaml").is_file():
            raise FileNotFoundError(f"{directory} is not a CMAN checkpoint (no metadata.json / config.yaml)")
        import yaml

        meta = json.loads(meta_path.read_text())
        config = from_dict(yaml.safe_load((directory / "config.yaml").read_text()))
        wanted = None if modalities is None else {Modality(m).value for m in modalities}
        unknown = sorted((wanted or set()) - set(meta["base_models"]))
        if unknown:
            have = meta["modalities"]
            raise ValueError(f"checkpoint {directory} has no {', '.join(unknown)} encoder (it has {have})")
        encoders, processors = {}, {}
        for name, base_meta in meta["base_models"].items():
            if wanted is None or name in wanted:
                modality = Modality(name)
                encoders[modality], processors[modality] = _load_encoder(directory, config, name, base_meta, trainable)
        model = cls(config, encoders, processors)
        heads = load_file(str(directory / "heads.safetensors"))
        skipped = {f"encoders.{name}." for name in meta["base_models"] if name not in model.encoders}
        heads = {k: v for k, v in heads.items() if not any(k.startswith(prefix) for prefix in skipped)}
        missing, unexpected = model.load_state_dict(heads, strict=False)
        missing = [k for k in missing if ".backbone." not in k]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {directory}: heads do not match the model (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
        if not trainable:
            model.eval()
            model.requires_grad_(False)
        model.checkpoint_metadata = meta
        return model


def _load_encoder(
    directory: Path, config: CMANConfig, name: str, base_meta: dict, trainable: bool
) -> tuple[ModalityEncoder, Processor]:
    """One modality's encoder (base checked against the checkpoint, adapters attached) and processor."""
    modality = Modality(name)
    mod_dir = directory / "encoders" / name
    ecfg = config.model.encoder(modality)
    backbone = _load_base(name, ecfg, mod_dir / "base" if base_meta["saved_base"] else None, directory)
    _check_fingerprint(name, base_meta, backbone.config, directory)
    _check_weights(name, base_meta, ecfg.pretrained, directory)
    if (mod_dir / "adapter").is_dir():
        with peft_wrapping():
            backbone = PeftModel.from_pretrained(backbone, mod_dir / "adapter", is_trainable=trainable)
    if trainable and not ecfg.freeze_base:
        for param in backbone.parameters():
            param.requires_grad = True
    mc = config.model
    encoder = ModalityEncoder(modality, backbone, mc.fusion.width, mc.dropout, mc.max_tokens, ecfg.tokens)
    return encoder, load_processor(mod_dir / "processor")


def _base_model(backbone: nn.Module) -> nn.Module:
    return backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone


def _save_base(backbone: nn.Module, directory: Path) -> None:
    """Save the plain base weights (LoRA layers stripped) as a standard HF model directory."""
    base = _base_model(backbone)
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    # transformers writes some architectures' weights under their pre-v5 names, which only its from_pretrained maps
    # back; a base with a conv stem is loaded with load_state_dict (encoders.load_backbone), so it keeps today's names
    base.save_pretrained(directory, state_dict=state, save_original_format=not has_conv_stem(base))


class MissingBaseError(FileNotFoundError):
    """A checkpoint's pretrained base model is neither stored in it, nor cached locally, nor reachable."""


def _load_base(name: str, ecfg: Any, saved: Path | None, directory: Path) -> nn.Module:
    """The encoder's base: from the checkpoint when stored there, else `ecfg.pretrained` (HF cache or hub)."""

    try:
        return load_backbone(ecfg, source=str(saved) if saved is not None else None)
    except OSError as err:
        source = str(saved) if saved is not None else ecfg.pretrained
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise MissingBaseError(
            f"checkpoint {directory}: the {name} encoder's base model {source!r} could not be loaded: it is not in "
            f"the local Hugging Face cache and the hub could not be reached{offline}. Download it on this node "
            f"(`hf download {source}`), allow hub access, or store the bases in the checkpoint: "
            "`cman.models.cman.make_self_contained(checkpoint, out_dir)`"
        ) from err


def make_self_contained(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Copy `checkpoint` to `out_dir` with its frozen pretrained bases stored inside (no hub or cache needed)."""
    model = CMAN.from_pretrained(checkpoint)
    keep = {k: v for k, v in model.checkpoint_metadata.items() if k not in ("format", "modalities", "base_models")}
    keep.pop("parameters", None)
    return model.save_pretrained(out_dir, metadata=keep, include_bases=True)


def _check_fingerprint(name: str, base_meta: dict, config: Any, directory: Path) -> None:
    expected, actual = base_meta["fingerprint"], fingerprint(config)
    diff = {k: (expected[k], actual.get(k)) for k in expected if actual.get(k) != expected[k]}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a} vs base {b}" for k, (a, b) in diff.items())
        raise ValueError(
            f"checkpoint {directory}: the {name} base model {base_meta['source']!r} does not match the one the "
            f"adapters were trained on ({detail}); point model.{name}.pretrained at the original base"
        )


def _check_weights(name: str, base_meta: dict, source: str | None, directory: Path) -> None:
    """A checkpoint of a frozen pretrained base names its weights' sha256: the base found now must have it."""
    expected = base_meta.get("weights_sha256")
    if not expected or source is None:
        return
    actual = weights_sha256(source)
    if actual is not None and actual != expected:
        raise ValueError(
            f"checkpoint {directory}: the {name} base model {source!r} does not match the one the adapters were "
            f"trained on (weights sha256: checkpoint {expected[:16]}… vs base {actual[:16]}…); point "
            f"model.{name}.pretrained at the original base"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def build_model(config: CMANConfig, captions: Iterable[str] | None = None) -> CMAN:
    """A fresh model for `config`; `captions` train the tokenizer of a random-init text encoder."""
    mc = config.model
    torch.manual_seed(config.training.seed)
    captions = list(captions) if captions is not None else None
    encoders, processors = {}, {}
    for modality in mc.modalities:
        ecfg = mc.encoder(modality)
        proc = build_processor(modality, ecfg, captions)
        vocab = len(proc.tokenizer) if modality == Modality.TEXT else None
        encoders[modality] = build_encoder(
            modality, ecfg, config.peft, mc.fusion.width, mc.dropout, mc.max_tokens, vocab_size=vocab
        )
        processors[modality] = proc
    model = CMAN(config, encoders, processors)
    trainable, total = count_parameters(model)
    logger.info(
        "CMAN built: %s trainable / %s total parameters (%.2f %%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return model
