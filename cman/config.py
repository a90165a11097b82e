"""Validated, nested CMAN configuration: YAML in, YAML out, `--set a.b=c` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo or an impossible value is one error
naming the key (``ConfigError: model.fusion.heads: ...``) before anything expensive starts.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cman.modality import Modality


class ConfigError(ValueError):
    """A configuration problem, with the dotted key and what to do about it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# Input cut into a 2-D patch grid (position_init: sincos, conv_stem).
PATCH_GRID_MODEL_TYPES = ("vit", "audio-spectrogram-transformer")


class EncoderConfig(_Section):
    """One modality's backbone: a hub id / local dir (`pretrained`) or a random-init HF config (`init`).

    Images also take EfficientNet-Lite: a weights directory (config.json + safetensors) or a .pth state dict as
    `pretrained`, or `init: {model_type: efficientnet-lite}` (cman.models.efficientnet)."""

    pretrained: str | None = None
    init: dict[str, Any] | None = Field(
        default=None, description="HF config dict (must hold model_type) for a randomly initialised backbone"
    )
    processor: str | None = Field(default=None, description="processor/tokenizer source; default: `pretrained`")
    freeze_base: bool = True
    max_length: int | None = Field(default=None, gt=0, description="text tokens / audio fbank frames")
    max_seconds: float = Field(default=10.0, gt=0, description="audio clips are cut to this length")
    image_size: int | None = Field(
        default=None,
        gt=0,
        description="random-init image encoders: input size; EfficientNet-Lite: the centre crop (default: its "
        "config.json's image_size, 224 for Lite0)",
    )
    length_percentile: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="random-init AST: set max_length (fbank frames) to cover this percentile of the training clips",
    )
    normalize: Literal["dataset", "utterance"] = Field(
        default="dataset",
        description="spectrogram audio: `dataset` = the extractor's fixed mean/std; `utterance` = per-utterance "
        "mean per mel bin and std removed (speaker/channel normalisation), padding at 0",
    )
    position_init: Literal["normal", "sincos"] = Field(
        default="normal",
        description="random-init ViT / AST: `normal` = HF's truncated normal (std initializer_range); `sincos` = a "
        "2-D sine-cosine table over the patch grid (trainable; MAE-style), strong enough next to the patch content "
        "for a model learning from scratch to tell where a patch is",
    )
    conv_stem: list[int] | None = Field(
        default=None,
        description="random-init ViT / AST: channel widths of 3x3 stride-2 convolutions (BatchNorm, ReLU) that replace "
        "the patch projection, then one convolution onto the same patch grid (a convolutional front-end: locality "
        "and small-shift invariance a transformer from scratch must otherwise learn from the data)",
    )
    tokens: Literal["sequence", "mean"] = Field(
        default="sequence",
        description="what reaches the fusion transformer: `sequence` = every token of the backbone's last layer; "
        "`mean` = one token, their masked mean (the sentence embedding of sentence-transformers models)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> EncoderConfig:
        if (self.pretrained is None) == (self.init is None):
            raise ValueError("set exactly one of `pretrained` (hub id or local dir) or `init` (HF config dict)")
        if self.init is not None and "model_type" not in self.init:
            raise ValueError("`init` needs a `model_type` key, e.g. roberta, vit, audio-spectrogram-transformer")
        if self.position_init != "normal" and self.pretrained is not None:
            raise ValueError(
                f"position_init: {self.position_init} is for random-init encoders (`init`); a pretrained encoder "
                "keeps its trained position embeddings: remove position_init"
            )
        if self.position_init == "sincos" and self.init["model_type"] not in PATCH_GRID_MODEL_TYPES:
            raise ValueError(
                f"position_init: sincos needs a ViT or AST backbone (a 2-D patch grid), not "
                f"model_type={self.init['model_type']!r}"
            )
        if self.conv_stem is not None:
            if self.init is None or self.init["model_type"] not in PATCH_GRID_MODEL_TYPES:
                raise ValueError(
                    "conv_stem replaces the patch projection of a random-init ViT or AST (`init` with model_type vit "
                    "or audio-spectrogram-transformer); a pretrained encoder keeps its trained one: remove conv_stem"
                )
            if not self.conv_stem or min(self.conv_stem) < 1:
                raise ValueError(f"conv_stem needs one or more positive channel widths, got {self.conv_stem}")
        return self


class FusionConfig(_Section):
    layers: int = Field(default=6, ge=1)
    heads: int = Field(default=8, ge=1)
    width: int = Field(default=512, ge=8, description="fusion transformer model width")
    ffn: int = Field(default=2048, ge=8)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    pool: Literal["cls", "mean"] = "cls"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> FusionConfig:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


class ModelConfig(_Section):
    text: EncoderConfig | None = None
    audio: EncoderConfig | None = None
    image: EncoderConfig | None = None
    fusion: FusionConfig = FusionConfig()
    embedding_dim: int = Field(default=512, ge=2)
    dropout: float = Field(default=0.3, ge=0.0, lt=1.0)
    max_tokens: int = Field(default=256, ge=1, description="tokens per modality handed to fusion (longer is pooled)")

    @model_validator(mode="after")
    def _some_encoder(self) -> ModelConfig:
        if not self.modalities:
            raise ValueError("configure at least one of model.text / model.audio / model.image")
        if self.embedding_dim % self.fusion.heads:
            raise ValueError(f"embedding_dim {self.embedding_dim} is not divisible by fusion.heads {self.fusion.heads}")
        return self

    @property
    def modalities(self) -> list[Modality]:
        return [m for m in Modality if getattr(self, m.value) is not None]

    def encoder(self, modality: Modality) -> EncoderConfig:
        enc = getattr(self, Modality(modality).value)
        if enc is None:
            raise ConfigError(f"model.{Modality(modality).value}: no encoder configured for this modality")
        return enc


class LoraSettings(_Section):
    enabled: bool = True
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    target_modules: dict[str, list[str]] | None = Field(
        default=None, description="per modality override; default: the architecture table in cman.models.lora"
    )


LossKind = Literal["max_margin", "infonce"]
MarginMode = Literal["hardest", "sum"]
IndexKind = Literal["flat", "ivf", "hnsw", "ivf_refine"]


class LossConfig(_Section):
    type: LossKind = "max_margin"
    margin: float = Field(default=0.2, gt=0.0, le=2.0)
    mode: MarginMode = "hardest"
    hardest_from_epoch: int | None = Field(
        default=None,
        ge=2,
        description="with mode: sum, switch to the hardest negative from this epoch on (a warm-up: from random "
        "projections the hardest-negative loss alone can collapse)",
    )
    temperature: float = Field(default=0.07, gt=0.0)

    @model_validator(mode="after")
    def _warm_up(self) -> LossConfig:
        if self.hardest_from_epoch is not None and (self.type != "max_margin" or self.mode != "sum"):
            raise ValueError("hardest_from_epoch warms up with summed hinges: it needs type max_margin, mode sum")
        return self


class AudioAugmentConfig(_Section):
    """Training-only audio augmentation (cman.data.augment); ranges are maxima, drawn per item and epoch."""

    enabled: bool = False
    tempo: float = Field(default=0.0, ge=0.0, lt=1.0, description="time-stretch factor range 1 ± tempo")
    freq_warp: float = Field(default=0.0, ge=0.0, lt=1.0, description="mel-axis stretch 1 ± freq_warp (VTLP)")
    gain: float = Field(default=0.0, ge=0.0, description="spectrogram: ± log-mel offset; waveform: ± dB")
    noise: float = Field(default=0.0, ge=0.0, description="std of Gaussian noise added to the features")
    shift_frames: int = Field(default=0, ge=0, description="random start delay, in 10 ms frames")
    time_masks: int = Field(default=0, ge=0, description="SpecAugment time masks per item")
    time_mask_width: int = Field(default=0, ge=0, description="max frames per time mask")
    freq_masks: int = Field(default=0, ge=0, description="SpecAugment frequency masks per item")
    freq_mask_width: int = Field(default=0, ge=0, description="max mel bins per frequency mask")


class ImageAugmentConfig(_Section):
    """Training-only image augmentation (cman.data.augment) on the processed pixels; ranges are maxima."""

    enabled: bool = False
    shift_pixels: int = Field(default=0, ge=0, description="random translation by up to this many pixels per axis")
    brightness: float = Field(default=0.0, ge=0.0, lt=1.0, description="pixels scaled by a factor 1 ± brightness")
    noise: float = Field(default=0.0, ge=0.0, description="std of Gaussian noise added to the normalised pixels")


class DataConfig(_Section):
    root: str | None = Field(default=None, description="dataset root in the seed layout")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    skip_bad_items: bool = False
    cache_features: bool = Field(default=True, description="keep preprocessed features in memory across epochs")
    num_workers: int = Field(default=0, ge=0)
    cache_dir: str | None = Field(
        default=None, description="memory-mapped preprocessing cache (cman.data.cache); keyed by processor + files"
    )
    max_items: int | None = Field(default=None, gt=0, description="use only the first N items of each split")
    audio_augment: AudioAugmentConfig = AudioAugmentConfig()
    image_augment: ImageAugmentConfig = ImageAugmentConfig()
    balance_speakers: bool = Field(
        default=True, description="training batches balanced over speakers when items carry a `speaker` field"
    )
    neighbour_batches: bool = Field(
        default=False,
        description="training batches of groups that differ in one attribute (groups like `small-blue-square-left`): "
        "hard negatives for data whose groups are attribute combinations (cman.data.sampler.NeighbourGroupSampler)",
    )


class TrainingConfig(_Section):
    epochs: int = Field(default=70, ge=1)
    batch_size: int = Field(default=32, ge=2)
    eval_batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0)
    encoder_learning_rate: float | None = Field(default=None, gt=0, description="default: learning_rate")
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0)
    grad_accum: int = Field(default=1, ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    compile: bool = Field(default=False, description="torch.compile the model (CUDA; slow to start on CPU)")
    fused_adamw: bool = Field(default=False, description="fused AdamW kernel (CUDA only; ignored on CPU)")
    seed: int = 0
    debug: bool = False
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when available")
    num_threads: int | None = Field(
        default=None, ge=1, description="torch CPU threads; default: all cores in-process, a Ray worker's CPU share"
    )
    checkpoint_every: int = Field(
        default=1,
        ge=0,
        description="write/report the last checkpoint every N epochs (0: only when best improves and at the end)",
    )


class RayConfig(_Section):
    num_workers: int = Field(default=1, ge=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    max_failures: int = Field(default=2, ge=0)


DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
# the four named dimensions of the sweep and the config keys they set (alpha_ratio sets peft.alpha = ratio * rank)
NAMED_SPACE_KEYS = {
    "rank": "peft.rank",
    "alpha_ratio": "peft.alpha",
    "margin": "loss.margin",
    "learning_rate": "training.learning_rate",
}


class TuneSpace(_Section):
    """What the sweep samples: the four named dimensions (`null` leaves one out) and any dotted config key with a
    distribution — `model.fusion.layers: {choice: [1, 2]}`, `training.batch_size: {choice: [16, 32]}`,
    `loss.temperature: {loguniform: [0.02, 0.2]}`, `training.weight_decay: {uniform: [0, 0.1]}`,
    `peft.dropout: {uniform: [0, 0.2]}`, `model.fusion.layers: {int: [1, 3]}` (both ends included)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())

    rank: list[int] | None = Field(default_factory=lambda: [4, 8, 16, 32])
    alpha_ratio: list[float] | None = Field(default_factory=lambda: [1.0, 2.0], description="alpha = ratio * rank")
    margin: tuple[float, float] | None = (0.05, 0.5)
    learning_rate: tuple[float, float] | None = (1e-5, 1e-3)

    @field_validator("rank")
    @classmethod
    def _ranks(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(r < 1 for r in v)):
            raise ValueError("rank choices must be a non-empty list of positive integers")
        return v

    @field_validator("alpha_ratio")
    @classmethod
    def _ratios(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(r <= 0 for r in v)):
            raise ValueError("alpha_ratio choices must be a non-empty list of positive numbers")
        return v

    @field_validator("margin", "learning_rate")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is None:
            return v
        low, high = v
        if not 0 < low <= high:
            raise ValueError(f"range [{low}, {high}] must satisfy 0 < low <= high")
        return v

    @model_validator(mode="after")
    def _keys(self) -> TuneSpace:
        named = {NAMED_SPACE_KEYS[k] for k in NAMED_SPACE_KEYS if getattr(self, k) is not None}
        for key in self.swept_keys():
            if key in named:
                short = next(k for k, v in NAMED_SPACE_KEYS.items() if v == key)
                raise ValueError(f"{key} is swept by tune.space.{short}: set that one (or tune.space.{short}=null)")
        return self

    def swept_keys(self) -> dict[str, dict[str, Any]]:
        """The dotted config keys swept besides the named four: `{"model.fusion.layers": {"choice": [1, 2]}}`."""
        return dict(_flatten_space(self.__pydantic_extra__ or {}, ""))


def _flatten_space(node: dict[str, Any], prefix: str):
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS:
            yield key, _check_distribution(key, value)
        elif isinstance(value, dict) and value:
            yield from _flatten_space(value, key + ".")
        else:
            raise ValueError(
                f"{key}: give a distribution, one of {{choice: [a, b, ...]}}, {{uniform: [low, high]}}, "
                f"{{loguniform: [low, high]}}, {{int: [low, high]}}; got {value!r}"
            )


def _check_distribution(key: str, dist: dict[str, Any]) -> dict[str, Any]:
    kind, values = next(iter(dist.items()))
    if not isinstance(values, list | tuple) or not values:
        raise ValueError(f"{key}: {kind} takes a non-empty list, got {values!r}")
    if kind == "choice":
        return {kind: list(values)}
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{key}: {kind} takes [low, high] (two numbers), got {values!r}")
    low, high = values
    if (
        low > high
        or (kind == "loguniform" and low <= 0)
        or (kind == "int" and not all(isinstance(v, int) for v in values))
    ):
        need = {"loguniform": "0 < low <= high", "int": "integers, low <= high"}.get(kind, "low <= high")
        raise ValueError(f"{key}: {kind} [{low}, {high}] must satisfy {need}")
    return {kind: [low, high]}


class TuneConfig(_Section):
    num_samples: int = Field(default=8, ge=1)
    max_concurrent: int = Field(default=1, ge=1)
    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float = Field(default=0.0, ge=0)
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=2, ge=2)
    seed: int = 0
    space: TuneSpace = TuneSpace()
    optuna_storage: str | None = Field(
        default=None,
        description="Optuna RDB storage URL (sqlite:///sweeps/optuna.db, postgresql://...) holding the sweep's study, "
        "to watch with optuna-dashboard or optuna.load_study; default: in memory",
    )

    @field_validator("optuna_storage")
    @classmethod
    def _storage_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z][\w+.-]*://", v):
            raise ValueError(
                f"{v!r} is not a database URL: give an SQLAlchemy URL such as sqlite:///optuna.db (relative path) or "
                "sqlite:////abs/optuna.db, or leave it unset for an in-memory study"
            )
        return v


class Autoscaling(_Section):
    """Serve autoscaling of a deployment: replicas between min and max, aiming at target ongoing requests each."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class ServeConfig(_Section):
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    max_upload_mb: float = Field(default=10.0, gt=0, description="per uploaded file; the body may hold 3 + 1 MiB")
    num_cpus_per_replica: float = Field(default=0.25, gt=0)
    num_gpus_per_replica: float = Field(default=0.0, ge=0)
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="encoders and fusion in serving and `cman index`: auto = bf16 on a CPU with AMX / AVX-512-BF16 "
        "and on bf16 GPUs, fp32 elsewhere; embeddings are returned as fp32 either way",
    )
    quantize: Literal["none", "int8"] = Field(
        default="none",
        description="encoders in serving and `cman index` (CPU only): int8 = dynamic int8 quantization of their "
        "Linear layers (weights int8 per channel, activations quantized per batch); fusion and embeddings stay fp32",
    )
    index_kind: Literal["auto", IndexKind] = Field(
        default="auto", description="auto: exact up to index_auto_exact_max items, index_auto_ann above"
    )
    index_auto_exact_max: int = Field(default=100_000, ge=0, description="auto: largest gallery searched exactly")
    index_auto_ann: Literal["ivf_refine", "ivf", "hnsw"] = Field(
        default="ivf_refine",
        description="auto, above index_auto_exact_max: ivf_refine (IVF over 8-bit scalar-quantised codes, "
        "candidates re-scored exactly), ivf (IVF-flat, as earlier releases) or hnsw",
    )
    encoder_replicas: int = Field(default=1, ge=1, description="replicas per encoder (without autoscaling)")
    encoder_autoscaling: Autoscaling | None = Field(default=None, description="autoscale encoders instead")
    retriever_replicas: int = Field(default=1, ge=1, description="Retriever replicas sharing one index directory")
    ingress_replicas: int = Field(
        default=1, ge=1, description="FastAPI ingress replicas (2+ on a cluster: a node lost takes only its own)"
    )
    gallery_store: str | None = Field(
        default=None,
        description="the gallery's database: sqlite:///<path> (one node; default: sqlite:///INDEX_DIR/gallery.db) "
        "or postgresql://user@host:port/db (replicas on several nodes)",
    )
    gallery_sync_s: float = Field(default=0.5, gt=0, description="replicas read each other's changes this often")
    gallery_compact_every: int = Field(
        default=1000, ge=1, exclude=True, description="ignored (there is no log to compact); earlier configs load"
    )
    index_shard_size: int = Field(default=4096, ge=1, description="cman index: items per shard (resume unit)")
    index_batch_size: int = Field(default=64, ge=1, description="cman index: items per Ray Data batch")
    index_actors: int = Field(default=1, ge=1, description="cman index: encoder actors per modality")
    index_cpus_per_actor: float = Field(default=1.0, gt=0, description="cman index: CPUs per encoder actor")
    index_gpus_per_actor: float = Field(default=0.0, ge=0, description="cman index: GPUs per encoder actor")
    api_key: str | None = Field(
        default=None,
        exclude=True,  # a secret: never written into a checkpoint's config.yaml; CMAN_API_KEY takes precedence
        description="require `Authorization: Bearer <key>` on every route but /healthz and the demo page",
    )
    max_text_chars: int = Field(default=2000, ge=1, description="after Unicode normalisation; longer → 413")
    max_audio_seconds: float = Field(default=60.0, gt=0, description="longer audio (from its header) → 413")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="width x height; larger → 413")
    max_form_fields: int = Field(default=8, ge=4, description="form fields + files per request; more → 413")
    max_batch_queries: int = Field(
        default=64, ge=1, le=1024, description="queries in one /v1 request (`queries: [...]`); more → 413"
    )
    request_timeout_s: float = Field(default=60.0, gt=0, description="a request still running after this → 504")
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="a request body not fully received this long after it started → 408"
    )
    max_queued_requests: int = Field(default=64, ge=1, description="per deployment; more waiting → 503")
    health_check_period_s: float = Field(default=10.0, gt=0, description="Serve calls check_health this often")

    @model_validator(mode="after")
    def _quantize_with_fp32(self) -> ServeConfig:
        if self.quantize == "int8" and self.dtype == "bf16":
            raise ValueError(
                "serve.quantize int8 computes the encoders with int8 weights and fp32 activations, which bf16 "
                "autocast cannot feed: set serve.dtype to fp32 or auto (auto computes int8 encoders in fp32), or "
                "serve.quantize to none"
            )
        return self

    @field_validator("gallery_store")
    @classmethod
    def _gallery_store_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(sqlite:///.+|postgresql(\+psycopg)?://.+)", v):
            raise ValueError(
                f"{v!r} is not a gallery store URL: use sqlite:///<path> (sqlite:////abs/gallery.db) or "
                "postgresql://user@host:port/db (the password in PGPASSWORD or ~/.pgpass, not in the URL), or leave "
                "it unset for INDEX_DIR/gallery.db"
            )
        return v


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(default=None, description="default: MLFLOW_TRACKING_URI or sqlite under output")
    experiment: str = "cman"
    registered_model: str | None = Field(
        default=None,
        description="the registry name a sweep's best model goes to; default: `cman`, or `cman-<dataset>` when "
        "cman's champion was trained on other data",
    )
    alias: str = Field(default="champion", description="the alias that marks the best version of that name")


class CMANConfig(_Section):
    model: ModelConfig
    peft: LoraSettings = LoraSettings()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    ray: RayConfig = RayConfig()
    tune: TuneConfig = TuneConfig()
    serve: ServeConfig = ServeConfig()
    mlflow: MlflowConfig = MlflowConfig()
    output_dir: str = "outputs/run"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (`model.fusion.layers: 6`) for experiment trackers."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) and node:
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(node, list | tuple):  # a search space or list option: one readable value
                out[prefix] = json.dumps(node)
            else:
                out[prefix] = node

        walk("", self.to_dict())
        return out

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> CMANConfig:
        return from_dict(apply_overrides(self.to_dict(), overrides))


def _did_you_mean(loc: tuple) -> str:
    """`; did you mean 'x'?` for an unknown key at `loc`, from the keys its section knows."""
    section: Any = CMANConfig
    for part in loc[:-1]:
        field = getattr(section, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        section = annotation
    known = list(getattr(section, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    return f"; did you mean {'.'.join(map(str, (*loc[:-1], close[0])))!r}?" if close else ""


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(e["loc"]) + " (`cman config schema` lists every key)"
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def from_dict(data: dict[str, Any]) -> CMANConfig:
    try:
        return CMANConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {_format_error(err)}") from None


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `data` with `a.b.c=value` overrides applied (values parsed as YAML)."""
    data = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: `{part}` is not a section")
        node[parts[-1]] = _parse_value(value) if isinstance(value, str) else value
    return data


def parse_override(item: str) -> tuple[str, str]:
    """`a.b=value` → (`a.b`, `value`); the value is parsed as YAML later."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.epochs=3")
    return key.strip(), value


def _is_relative_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(("./", "../")) or value in (".", ".."))


def resolve_model_paths(data: dict[str, Any], config_path: str | Path) -> dict[str, Any]:
    """Make relative `model.<modality>.pretrained` / `.processor` paths (`./…`, `../…`) absolute.

    Tried in order: the current directory, the project root of the config file (the parent of its `configs/`
    folder, else its own folder), and `$CMAN_ROOT` (set it in the runtime env of a `ray job submit`, whose driver
    runs in an uploaded copy of the project). Absolute paths reach Ray workers unchanged and are what checkpoints
    record; a relative path found nowhere is a ConfigError naming the key and the places tried. Hub ids (no leading
    `./` or `../`) are left alone.
    """
    import os

    config_dir = Path(config_path).resolve().parent
    bases = [Path.cwd(), config_dir.parent if config_dir.name == "configs" else config_dir]
    if os.environ.get("CMAN_ROOT"):
        bases.append(Path(os.environ["CMAN_ROOT"]))
    model = data.get("model")
    if not isinstance(model, dict):
        return data
    data = copy.deepcopy(data)
    for modality in ("text", "audio", "image"):
        enc = data["model"].get(modality)
        for key in ("pretrained", "processor"):
            value = enc.get(key) if isinstance(enc, dict) else None
            if not _is_relative_path(value):
                continue
            found = next((base / value for base in bases if (base / value).exists()), None)
            if found is None:
                tried = ", ".join(str(base / value) for base in bases)
                raise ConfigError(f"{config_path}: model.{modality}.{key}: {value!r} not found (tried {tried})")
            enc[key] = str(found.resolve())
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """One YAML config file as a mapping; `ConfigError` naming the file if it is missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.exists() or path.is_dir():  # a pipe is fine: --config <(cman config show ...)
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def merge_config_data(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_config_data(out[key], value) if both else value
    return out


def load_configs(paths: list[str | Path], overrides: list[str] | dict[str, Any] | None = None) -> CMANConfig:
    """Config files merged in order (later keys win, mappings merged key by key; each file's relative model paths
    resolved against it), then `a.b=value` overrides (their relative model paths against the last file)."""
    paths = [Path(p) for p in paths]
    data: dict[str, Any] = {}
    for path in paths:
        data = merge_config_data(data, resolve_model_paths(read_config_file(path), path))
    if overrides:
        data = resolve_model_paths(apply_overrides(data, overrides), paths[-1])
    try:
        return from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{' + '.join(map(str, paths))}: {err}") from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> CMANConfig:
    """Load one YAML config (`load_configs` of one file)."""
    return load_configs([path], overrides)
