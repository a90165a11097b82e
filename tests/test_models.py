"""Encoders load through from_pretrained, carry LoRA in every attention, fuse any subset, round-trip exactly."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from tiny import pretrained_config, save_tiny_backbones

from cman.config import CMANConfig
from cman.modality import ALL_MODALITIES, Modality
from cman.models import CMAN, build_model, count_parameters
from cman.models.lora import LORA_TARGETS, lora_module_count


@pytest.fixture(scope="module", params=["ast", "hubert"])
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"tiny_{request.param}")
    dirs = save_tiny_backbones(root, audio=request.param)
    media = root / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    sf.write(media / "a.wav", (rng.standard_normal(12000) * 0.1).astype("float32"), 16000)
    sf.write(media / "b.wav", (rng.standard_normal(20000) * 0.1).astype("float32"), 16000)
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")).save(media / "a.png")
    Image.fromarray((rng.random((30, 30, 3)) * 255).astype("uint8")).save(media / "b.png")
    return {"dirs": dirs, "media": media, "audio": request.param}


def _batch(model: CMAN, media) -> dict[Modality, dict[str, torch.Tensor]]:
    sources = {
        Modality.TEXT: ["a small red circle on the left", "a large blue square"],
        Modality.AUDIO: [media / "a.wav", media / "b.wav"],
        Modality.IMAGE: [media / "a.png", media / "b.png"],
    }
    out = {}
    for modality, items in sources.items():
        proc = model.processors[modality]
        out[modality] = proc.collate([proc.features(proc.load(s)) for s in items])
    return out


def test_every_encoder_gets_adapters_on_its_attention(tiny):
    model = build_model(pretrained_config(tiny["dirs"]))
    for modality in ALL_MODALITIES:
        backbone = model.encoders[modality.value].backbone
        model_type = backbone.config.model_type
        adapted = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if hasattr(m, "lora_A") and m.lora_A}
        assert adapted == set(LORA_TARGETS[model_type]), (modality, adapted)
        assert lora_module_count(backbone) == 2 * len(LORA_TARGETS[model_type])  # 2 layers
        # base weights frozen, adapters trainable
        for name, param in backbone.named_parameters():
            assert param.requires_grad == ("lora_" in name), name


def test_any_subset_gives_normalised_embedding(tiny):
    model = build_model(pretrained_config(tiny["dirs"])).eval()
    batch = _batch(model, tiny["media"])
    seen = []
    with torch.no_grad():
        for r in (1, 2, 3):
            for subset in itertools.combinations(ALL_MODALITIES, r):
                emb = model.embed_features({m: batch[m] for m in subset})  # (2, 16)
                assert emb.shape == (2, 16)
                torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
                seen.append(emb)
    # different subsets give different embeddings (modality-type embeddings and tokens matter)
    assert not torch.allclose(seen[0], seen[-1])
    with pytest.raises(ValueError, match="at least one modality"):
        model.embed_features({})


def test_checkpoint_round_trip_identical_embeddings(tiny, tmp_path):
    model = build_model(pretrained_config(tiny["dirs"]))
    with torch.no_grad():  # make adapters non-trivial so the round trip proves they are saved
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.eval()
    batch = _batch(model, tiny["media"])
    with torch.no_grad():
        before = model(batch)
        composed = model.embed_features(batch)
    model.save_pretrained(tmp_path / "ckpt", metadata={"epoch": 3})
    files = {p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert "encoders/text/adapter/adapter_model.safetensors" in files
    assert "heads.safetensors" in files and "config.yaml" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert not any(f.startswith("encoders/") and "/base/" in f for f in files)  # frozen hub bases are not copied
    loaded = CMAN.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        after = loaded(_batch(loaded, tiny["media"]))
        composed_after = loaded.embed_features(_batch(loaded, tiny["media"]))
    for modality in ALL_MODALITIES:
        torch.testing.assert_close(after[modality], before[modality], atol=1e-6, rtol=0)
    torch.testing.assert_close(composed_after, composed, atol=1e-6, rtol=0)
    meta = json.loads((tmp_path / "ckpt" / "metadata.json").read_text())
    assert meta["epoch"] == 3 and meta["base_models"]["text"]["source"] == str(tiny["dirs"]["text"])
    # merged LoRA gives the same outputs
    loaded.merge_adapters()
    with torch.no_grad():
        merged = loaded(_batch(loaded, tiny["media"]))
    torch.testing.assert_close(merged[Modality.TEXT], before[Modality.TEXT], atol=1e-5, rtol=0)


def test_mismatched_base_model_is_a_clear_error(tiny, tmp_path):
    model = build_model(pretrained_config(tiny["dirs"]))
    model.save_pretrained(tmp_path / "ckpt")
    # swap the text base for a different architecture size under the same path
    from transformers import RobertaConfig, RobertaModel

    other = tmp_path / "other_text"
    RobertaModel(
        RobertaConfig(
            vocab_size=120,
            hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=40,
        )
    ).save_pretrained(other)
    cfg_path = tmp_path / "ckpt" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace(str(tiny["dirs"]["text"]), str(other)))
    with pytest.raises(ValueError, match=r"text base model .* does not match .*hidden_size: checkpoint 32 vs base 48"):
        CMAN.from_pretrained(tmp_path / "ckpt")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a CMAN checkpoint"):
        CMAN.from_pretrained(tmp_path)


def test_default_sizes_keep_lora_trainable_share_near_seed():
    """roberta-base / AST-base / ViT-base sizes, random-init (no download): LoRA r=8 keeps ~0.57 % of the encoders."""
    base = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    cfg = CMANConfig.model_validate(
        {
            "model": {
                "text": {
                    "init": {"model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514, **base}
                },
                "audio": {"init": {"model_type": "audio-spectrogram-transformer", "max_length": 1024, **base}},
                "image": {"init": {"model_type": "vit", "image_size": 224, "patch_size": 16, **base}},
            },
            "peft": {"rank": 8, "alpha": 16},
        }
    )
    model = build_model(cfg, captions=["a caption"] * 4)
    encoders = model.encoders
    lora = sum(p.numel() for n, p in encoders.named_parameters() if "lora_" in n)
    backbone_total = sum(p.numel() for e in encoders.values() for p in e.backbone.parameters())
    share = 100 * lora / backbone_total
    assert 0.4 < share < 0.8, share  # q,k,v adapters on 3 x 12 layers of 768-d
    trainable, total = count_parameters(model)
    assert trainable < 0.1 * total


def test_from_pretrained_loads_only_requested_modalities(tiny, tmp_path):
    """A Serve encoder replica loads its own backbone only; the Retriever loads fusion + projections only."""
    build_model(pretrained_config(tiny["dirs"])).save_pretrained(tmp_path / "ckpt")
    full = CMAN.from_pretrained(tmp_path / "ckpt")
    fusion = sum(p.numel() for p in full.fusion.parameters())
    reference = full.state_dict()
    for modality in ALL_MODALITIES:
        part = CMAN.from_pretrained(tmp_path / "ckpt", modalities=[modality.value])
        assert part.modalities == [modality]
        own = sum(p.numel() for p in full.encoders[modality.value].parameters())
        assert count_parameters(part)[1] == own + fusion
        for key, value in part.state_dict().items():
            assert torch.equal(value, reference[key]), key
    fusion_only = CMAN.from_pretrained(tmp_path / "ckpt", modalities=[])
    assert fusion_only.modalities == [] and count_parameters(fusion_only)[1] == fusion
    with pytest.raises(ValueError):
        CMAN.from_pretrained(tmp_path / "ckpt", modalities=["video"])


def test_mean_token_is_the_masked_mean_whatever_the_padding(tiny, tmp_path):
    """`model.text.tokens: mean` hands the fusion one token, the mean over the caption's real tokens: padding it
    beside a longer caption changes nothing, and the setting survives a checkpoint round trip."""
    model = build_model(pretrained_config(tiny["dirs"], **{"model.text.tokens": "mean"})).eval()
    proc = model.processors[Modality.TEXT]
    short, long = "a red circle", "a small red circle on the left beside a large blue square"
    alone = proc.collate([proc.features(proc.load(short))])
    padded = proc.collate([proc.features(proc.load(c)) for c in (short, long)])
    assert padded["attention_mask"].shape[1] > alone["attention_mask"].shape[1]
    encoder = model.encoders[Modality.TEXT.value]
    with torch.no_grad():
        tokens, mask = encoder(alone)
        tokens_padded, mask_padded = encoder(padded)
        assert tokens.shape[1] == 1 and mask.tolist() == [[True]] and mask_padded.tolist() == [[True], [True]]
        torch.testing.assert_close(tokens_padded[:1], tokens, atol=1e-5, rtol=0)
        before = model.embed_features({Modality.TEXT: padded})
    model.save_pretrained(tmp_path / "ckpt")
    loaded = CMAN.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.encoders[Modality.TEXT.value].tokens == "mean"
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_features({Modality.TEXT: padded}), before, atol=1e-6, rtol=0)


def test_sincos_positions_for_random_init_patch_grids():
    from cman.config import EncoderConfig
    from cman.models.encoders import load_backbone, sincos_table

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    vit = {"model_type": "vit", "image_size": 32, "patch_size": 8, **small}
    ast = {"model_type": "audio-spectrogram-transformer", "num_mel_bins": 32, "max_length": 64, "patch_size": 16,
           "frequency_stride": 16, "time_stride": 8, **small}  # fmt: skip
    for init, special, grid in ((vit, 1, (4, 4)), (ast, 2, (2, 7))):
        plain = load_backbone(EncoderConfig(init=init, freeze_base=False)).embeddings.position_embeddings
        sincos = load_backbone(EncoderConfig(init=init, freeze_base=False, position_init="sincos"))
        table = sincos.embeddings.position_embeddings
        assert table.shape == plain.shape == (1, special + grid[0] * grid[1], 32) and table.requires_grad
        assert torch.equal(table[0, special:], sincos_table(*grid, 32))
        assert float(plain.detach().std()) < 0.05 < 0.3 < float(table[0, special:].detach().std())  # HF: std 0.02
        patches = table[0, special:].detach()
        distances = torch.cdist(patches, patches) + torch.eye(len(patches)) * 1e9
        assert float(distances.min()) > 0.1  # every patch position has its own code
    with pytest.raises(ValueError, match="position_init: sincos is for random-init encoders"):
        EncoderConfig(pretrained="google/vit-base-patch16-224", position_init="sincos")
    with pytest.raises(ValueError, match="position_init: sincos needs a ViT or AST"):
        load_backbone(EncoderConfig(init={"model_type": "roberta", **small}, freeze_base=False, position_init="sincos"))


def test_conv_stem_keeps_the_patch_grid_trains_and_round_trips(tmp_path):
    """A conv front-end replaces the ViT / AST patch projection: same tokens out, its weights learn (random-init base
    trains), BatchNorm statistics included, and a checkpoint reloads it to identical embeddings."""
    from tiny import tiny_config

    from cman.config import EncoderConfig
    from cman.models.encoders import load_backbone
    from cman.models.stem import ConvStem, patch_grid

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    vit = {"model_type": "vit", "image_size": 32, "patch_size": 8, **small}
    ast = {"model_type": "audio-spectrogram-transformer", "num_mel_bins": 32, "max_length": 70, "patch_size": 16,
           "frequency_stride": 16, "time_stride": 8, **small}  # fmt: skip
    for init, inputs in (
        (vit, {"pixel_values": torch.randn(3, 3, 32, 32)}),
        (ast, {"input_values": torch.randn(3, 70, 32)}),
    ):
        plain = load_backbone(EncoderConfig(init=init, freeze_base=False)).eval()
        stem = load_backbone(EncoderConfig(init=init, freeze_base=False, conv_stem=[8, 16])).eval()
        assert isinstance(stem.embeddings.patch_embeddings.projection, ConvStem)
        assert patch_grid(stem) == patch_grid(plain)
        assert stem(**inputs).last_hidden_state.shape == plain(**inputs).last_hidden_state.shape

    config = tiny_config(tmp_path, **{"model.audio.conv_stem": [8, 16], "model.image.conv_stem": [8]})
    model = build_model(config, captions=["a red circle", "a blue square"])
    batch = {
        Modality.AUDIO: {"input_values": torch.randn(4, config.model.audio.init["max_length"], 32)},
        Modality.IMAGE: {"pixel_values": torch.randn(4, 3, 64, 64)},
    }
    stem = model.encoders["audio"].backbone.get_base_model().embeddings.patch_embeddings.projection
    assert all(p.requires_grad for p in stem.parameters())
    first = stem[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(batch)
    (out[Modality.AUDIO] * out[Modality.IMAGE]).sum().neg().backward()
    optimizer.step()
    assert not torch.equal(stem[0].weight, first) and int(stem[1].num_batches_tracked) == 1
    model.eval()
    with torch.no_grad():
        before = model(batch)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = CMAN.from_pretrained(tmp_path / "ckpt")
    assert isinstance(
        loaded.encoders["audio"].backbone.get_base_model().embeddings.patch_embeddings.projection, ConvStem
    )
    with torch.no_grad():
        after = loaded(batch)
    for modality in batch:
        torch.testing.assert_close(after[modality], before[modality], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("encoder", "message"),
    [
        ({"pretrained": "google/vit-base-patch16-224", "conv_stem": [16]}, "a pretrained encoder keeps its trained"),
        ({"init": {"model_type": "roberta"}, "conv_stem": [16]}, "random-init ViT or AST"),
        ({"init": {"model_type": "vit"}, "conv_stem": []}, "one or more positive channel widths"),
    ],
)
def test_conv_stem_config_errors(encoder, message):
    from cman.config import EncoderConfig

    with pytest.raises(ValueError, match=message):
        EncoderConfig(**encoder)
