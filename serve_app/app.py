"""`build_app(args) -> Application`: encoders per modality + Retriever + FastAPI ingress, composed by handles.

Used by `serve run serve_app.app:build_app checkpoint=... index_dir=...`, by `serve_app/config.yaml`
(`serve deploy`), by `cman serve` and by the tests. Nothing is read at import time.
"""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from cman.config import ServeConfig
from cman.modality import Modality


class ServeArgs(BaseModel):
    """Application arguments: where the checkpoint and the index live, and optional serving settings."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    checkpoint: str = Field(description="CMAN checkpoint directory (CMAN.from_pretrained loads it)")
    index_dir: str = Field(description="index directory from `cman index` (one GalleryIndex per modality)")
    config: str | None = Field(
        default=None,
        description="YAML config whose `serve:` section is used; default: the checkpoint's own config.yaml",
    )
    serve: dict[str, Any] = Field(default_factory=dict, description="overrides of `serve:` keys, e.g. max_batch_size")
    host: str = Field(
        default="127.0.0.1",
        description="the address Serve's HTTP proxy binds (http_options.host): without an API key, a non-loopback "
        "bind refuses state-changing routes",
    )


def resolve_serve_config(args: ServeArgs) -> ServeConfig:
    """The `serve:` section of `args.config` (or of the checkpoint's config), with `args.serve` applied."""
    from cman.config import load_config

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint} is not a CMAN checkpoint (no metadata.json); train one or pass "
            "--checkpoint pointing at checkpoints/best"
        )
    source = Path(args.config) if args.config else checkpoint / "config.yaml"
    loaded = load_config(source).serve
    base = {**loaded.model_dump(), "api_key": loaded.api_key}  # api_key is excluded from dumps (a secret)
    return ServeConfig.model_validate({**base, **args.serve})


def checkpoint_modalities(checkpoint: Path) -> list[str]:
    import json

    return list(json.loads((checkpoint / "metadata.json").read_text())["base_models"])


def build_app(args: ServeArgs) -> Application:
    """Compose the deployments for `args` (Serve validates the dict of `serve run`/config.yaml into ServeArgs)."""
    from serve_app.encoders import DEPLOYMENT_NAMES, EncoderDeployment
    from serve_app.security import resolve_api_key

    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    checkpoint = Path(args.checkpoint).expanduser().resolve()
    index_dir = Path(args.index_dir).expanduser().resolve()
    cfg = resolve_serve_config(args.model_copy(update={"checkpoint": str(checkpoint)}))
    key = resolve_api_key(cfg.api_key)
    cfg = cfg.model_copy(update={"api_key": None})  # replicas get limits, never the key
    # Batching only helps if a replica may hold a full batch (plus the next one filling up) at once.
    ongoing = max(2 * cfg.max_batch_size, 8)
    scaling: dict[str, Any] = {"num_replicas": cfg.encoder_replicas}
    if cfg.encoder_autoscaling is not None:
        scaling = {"num_replicas": "auto", "autoscaling_config": cfg.encoder_autoscaling.model_dump()}
    encoders = {}
    for name in checkpoint_modalities(checkpoint):
        deployment = EncoderDeployment.options(
            name=DEPLOYMENT_NAMES[Modality(name)], max_ongoing_requests=ongoing, **_common_options(cfg), **scaling
        )
        encoders[name] = deployment.bind(str(checkpoint), name, cfg)
    retriever = build_retriever(cfg, checkpoint, index_dir, encoders)
    return build_ingress(cfg, key, args.host, retriever, encoders)


def _common_options(cfg: ServeConfig) -> dict[str, Any]:
    """Deployment options every encoder and Retriever replica shares: its CPU/GPU share, queue and health check."""
    return {
        "ray_actor_options": {"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
        "max_queued_requests": cfg.max_queued_requests,
        "health_check_period_s": cfg.health_check_period_s,
    }


def build_retriever(cfg: ServeConfig, checkpoint: Path, index_dir: Path, encoders: dict[str, Any]) -> Any:
    """The bound Retriever over `index_dir` (`cfg.retriever_replicas` replicas); `encoders` are bound deployments,
    or handles of a running application's encoders."""
    from serve_app.retriever import RetrieverDeployment

    options = {"max_ongoing_requests": 256, "num_replicas": cfg.retriever_replicas, **_common_options(cfg)}
    return RetrieverDeployment.options(**options).bind(
        encoders,
        str(checkpoint),
        str(index_dir),
        cfg.index_kind,
        cfg.num_cpus_per_replica,
        cfg.num_gpus_per_replica,
        serve_config=cfg.model_dump(),
    )


def build_ingress(
    cfg: ServeConfig, key: str | None, host: str, retriever: Any, encoders: dict[str, Any]
) -> Application:
    """The FastAPI ingress over `retriever` + `encoders` (bound deployments, or handles of a running application)."""
    from serve_app.ingress import Ingress
    from serve_app.security import key_digest

    settings = {**cfg.model_dump(), "api_key_sha256": key_digest(key), "bind_host": host}
    ingress_cpus = min(cfg.num_cpus_per_replica, 1.0)
    options = {
        "max_ongoing_requests": 256,
        "max_queued_requests": cfg.max_queued_requests,
        "num_replicas": cfg.ingress_replicas,
    }
    return Ingress.options(ray_actor_options={"num_cpus": ingress_cpus}, **options).bind(retriever, encoders, settings)
