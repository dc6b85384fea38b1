"""The model's settings: one typed tree, serialised as JSON inside every checkpoint and encoder.

A backbone or segmenter is either *pretrained* (named by a local path or a Hugging Face hub id and
loaded with `from_pretrained`; its weights are never copied into our files) or *config-built*
(`arch` holds the transformers config dict; random init; its weights travel in our safetensors).
`arch` may also be set beside `pretrained`: it then only describes the architecture, so that
parameter counts and meta-device builds work without the weights.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from geosurge_index.errors import UserError

DEFAULT_BACKBONE = "openai/clip-vit-large-patch14-336"
DEFAULT_ONEFORMER = "shi-labs/oneformer_ade20k_swin_large"
DEFAULT_SEGFORMER = "nvidia/segformer-b0-finetuned-ade-512-512"
NUM_ADE20K_CLASSES = 150
# Each segmenter's own test resolution (short side / square side it was evaluated at on ADE20K).
SEGMENTER_INPUT_SIZE = {"oneformer": 640, "segformer": 512}
# The fusion read-outs (`FusionConfig.readout`): "cls" = the fused semantic CLS token alone (the
# read-out of checkpoints written before the option existed); "cls+clip" = the fused CLS
# concatenated with CLIP's own CLS token before the LayerNorm + Linear (a residual path from CLIP
# to the embedding); "joint" = CLIP's CLS as the query of one attention over the fused semantic
# tokens (projected to CLIP's width) and CLIP's tokens together, added to CLIP's CLS; "gated" = CLIP's
# CLS + g * Linear(fused CLS) with a per-channel gate g starting at 0 (the model starts as no fusion).
# "joint" and "gated" then take CLIP's path: LayerNorm + Linear (model/fusion.py, model/encoder.py).
# The default is the measured choice (ARCHITECTURE.md, "paper unclear, measured").
READOUTS = ("cls", "cls+clip", "joint", "gated")
LEGACY_READOUT = "cls"
HEADS = ("geo", "classifier")
DEFAULT_READOUT = "cls+clip"
# `FusionConfig.token_norm`: on for new configs (measured: ARCHITECTURE.md, "Measured choices");
# configs and checkpoints written before the option load as LEGACY_TOKEN_NORM, as they were trained.
DEFAULT_TOKEN_NORM = True
LEGACY_TOKEN_NORM = False
EMBED_DIM = 768
NUM_LEVELS = 7
SEGMENTER_KINDS = ("oneformer", "segformer", "small", "none")
# The small convolutional segmenter (`model/small_segmenter.py`): encoder widths at 1/2, 1/4, 1/8 of
# the input; `labels` (the ADE20K ids it predicts) is filled in by its training from the class maps.
SMALL_SEGMENTER_ARCH: dict[str, Any] = {"model_type": "small_conv", "widths": [32, 64, 96], "context": True, "dilations": [1, 2, 4],
                                        "labels": list(range(NUM_ADE20K_CLASSES))}

# Architecture configs of the default checkpoints (copied from their hub config.json), so that the
# full-size model can be built on the meta device (parameter counts, shapes) with nothing downloaded.
KNOWN_ARCHS: dict[str, dict[str, Any]] = {
    DEFAULT_BACKBONE: {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
    },
    DEFAULT_ONEFORMER: {
        "model_type": "oneformer",
        "backbone_config": {
            "model_type": "swin",
            "embed_dim": 192,
            "depths": [2, 2, 18, 2],
            "num_heads": [6, 12, 24, 48],
            "window_size": 12,
            "image_size": 384,
            "drop_path_rate": 0.3,
            "out_features": ["stage1", "stage2", "stage3", "stage4"],
        },
        "num_queries": 250,
        "num_labels": NUM_ADE20K_CLASSES,
    },
    DEFAULT_SEGFORMER: {"model_type": "segformer", "num_labels": NUM_ADE20K_CLASSES},
}


@dataclass
class BackboneConfig:
    """CLIP vision transformer (transformers `CLIPVisionModel`)."""

    pretrained: str | None = DEFAULT_BACKBONE  # local dir or hub id; None: config-built from `arch`
    arch: dict[str, Any] | None = None  # CLIPVisionConfig kwargs
    unfreeze_last_n: int = 0  # the last N transformer layers train; the rest stay frozen


@dataclass
class SegmenterConfig:
    """The semantic segmenter giving ADE20K class maps when none was precomputed.

    `kind` small is the project's own small convolutional segmenter (`model/small_segmenter.py`):
    always config-built from `arch` (SMALL_SEGMENTER_ARCH), trained on class maps by
    `geosurge_index.segmenter_train`, its weights stored in our safetensors like any config-built
    part. `trained_on` says in words what a config-built segmenter was trained on; a config-built
    segmenter without it has random weights (`is_trained`)."""

    kind: str = "oneformer"  # oneformer | segformer | small | none (class maps must then be given)
    pretrained: str | None = DEFAULT_ONEFORMER
    arch: dict[str, Any] | None = None  # OneFormerConfig / SegformerConfig / small-segmenter kwargs
    # The segmenter runs on the region the backbone sees (the centre crop, or each ten-crop box)
    # resized to this square side. None: the checkpoint's own test size (SEGMENTER_INPUT_SIZE:
    # 640 for OneFormer Swin-L ADE20K, whose ADE20K test resolution is a 640 short side; 512 for
    # SegFormer ADE20K, trained on 512 crops). Configs written before this default keep their 512.
    input_size: int | None = None
    trained_on: str | None = None  # config-built and trained: on what (None: random weights)

    def __post_init__(self):
        if self.input_size is None:
            self.input_size = SEGMENTER_INPUT_SIZE.get(self.kind, 512)

    @property
    def is_trained(self) -> bool:
        """Whether the segmenter's weights mean anything: pretrained, or config-built and trained."""
        return self.kind == "none" or self.pretrained is not None or self.trained_on is not None


@dataclass
class FusionConfig:
    """Semantic tokens and the latent cross-attention fusion blocks."""

    enabled: bool = True  # False: CLIP alone (CLS -> LayerNorm -> Linear)
    blocks: int = 3
    query_dim: int = 128  # width of the semantic (query) token stream
    latent_dim: int = 64  # queries and keys are projected to this width inside attention
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    self_attention: bool = True  # mix the semantic tokens after each cross-attention (see fusion.py)
    readout: str = DEFAULT_READOUT  # see READOUTS; configs without the key load as LEGACY_READOUT
    # LayerNorm on the semantic tokens (Linear(histogram)) before the position is added, so that the
    # class map enters the fusion blocks at the scale of the CLIP tokens it is mixed with (without
    # it the map moved the fused CLS by 4% at initialisation, CLIP's tokens by 70%: fusion/SemanticTokens).
    # On by default; configs without the key load as LEGACY_TOKEN_NORM (their weights have no such norm).
    token_norm: bool = DEFAULT_TOKEN_NORM


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    embed_dim: int = EMBED_DIM
    num_classes: int = NUM_ADE20K_CLASSES
    init_temperature: float = 0.07
    geo_init_std: float = 0.02
    # "geo": the paper's geographic embeddings (a cosine / temperature per cell, every level);
    # "classifier": a plain Linear classification head over the cells of the finest level alone
    # (an ablation: `geosurge ablations`; it trains and validates but cannot be exported as an index)
    head: str = "geo"

    # -- derived -----------------------------------------------------------------------------
    def backbone_arch(self) -> dict[str, Any]:
        """The backbone's CLIPVisionConfig kwargs, from `arch`, the known table, or a local config."""
        return _arch_of(self.backbone.arch, self.backbone.pretrained, "backbone")

    def segmenter_arch(self) -> dict[str, Any]:
        return _arch_of(self.segmenter.arch, self.segmenter.pretrained, "segmenter")

    @property
    def image_size(self) -> int:
        """Side of the square the encoder takes (preprocess images with `images.Preprocess(size)`)."""
        return int(self.backbone_arch().get("image_size", 224))

    @property
    def patch_size(self) -> int:
        return int(self.backbone_arch().get("patch_size", 32))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["segmenter"]["trained_on"] is None:  # absent unless set: older readers keep reading our files
            del d["segmenter"]["trained_on"]
        if d["fusion"]["token_norm"] == LEGACY_TOKEN_NORM:  # likewise (absent = the legacy value)
            del d["fusion"]["token_norm"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = copy.deepcopy(d)
        fusion = d.pop("fusion", {})
        if isinstance(fusion, dict):
            # written before the read-out was an option: the read-out those weights were trained with
            fusion.setdefault("readout", LEGACY_READOUT)
            fusion.setdefault("token_norm", LEGACY_TOKEN_NORM)
        try:
            return cls(
                backbone=BackboneConfig(**d.pop("backbone", {})),
                segmenter=SegmenterConfig(**d.pop("segmenter", {})),
                fusion=FusionConfig(**fusion),
                **d,
            )
        except TypeError as err:
            raise UserError(f"bad model config: {err}") from err

    def validate(self) -> ModelConfig:
        if self.segmenter.kind not in SEGMENTER_KINDS:
            raise UserError(
                f"model.segmenter.kind = {self.segmenter.kind!r}: choose oneformer, segformer, small or none"
            )
        if self.segmenter.kind == "small" and (self.segmenter.pretrained is not None or self.segmenter.arch is None):
            raise UserError("model.segmenter: kind small is config-built: set `arch` (e.g. SMALL_SEGMENTER_ARCH) "
                            "and leave `pretrained` unset; its weights travel in the encoder files")
        if self.backbone.pretrained is None and self.backbone.arch is None:
            raise UserError("model.backbone: set `pretrained` (path or hub id) or `arch` (a config)")
        if self.segmenter.kind != "none" and self.segmenter.pretrained is None and self.segmenter.arch is None:
            raise UserError("model.segmenter: set `pretrained` (path or hub id) or `arch` (a config)")
        f = self.fusion
        if f.readout not in READOUTS:
            raise UserError(f"model.fusion.readout = {f.readout!r}: choose one of {', '.join(READOUTS)}")
        if self.head not in HEADS:
            raise UserError(f"model.head = {self.head!r}: choose one of {', '.join(HEADS)}")
        if self.segmenter.input_size is not None and self.segmenter.input_size < 32:
            raise UserError(f"model.segmenter.input_size = {self.segmenter.input_size}: at least 32")
        if f.enabled and (f.query_dim % f.heads or f.latent_dim % f.heads):
            raise UserError("model.fusion: query_dim and latent_dim must be multiples of heads")
        if self.image_size % self.patch_size:
            raise UserError("backbone image_size must be a multiple of patch_size")
        return self


def _arch_of(arch: dict | None, pretrained: str | None, what: str) -> dict[str, Any]:
    if arch is not None:
        return arch
    if pretrained in KNOWN_ARCHS:
        return KNOWN_ARCHS[pretrained]
    if pretrained is not None:
        # A local directory or a cached hub id: read its config.json (no weights needed).
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(pretrained)
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds here
            raise UserError(
                f"{what} {pretrained!r}: cannot read its config ({err}); give a local path or set `arch`"
            ) from err
        d = cfg.to_dict()
        if d.get("model_type") == "clip":  # a full CLIP checkpoint: take its vision half
            d = dict(d["vision_config"], model_type="clip_vision_model")
        return d
    raise UserError(f"{what}: neither `pretrained` nor `arch` is set")


def full_config() -> ModelConfig:
    """The paper's set-up: CLIP ViT-L/14-336 + OneFormer Swin-L ADE20K + 3 fusion blocks."""
    return ModelConfig().validate()


def tiny_config(segmenter: str = "segformer") -> ModelConfig:
    """A config-built model small enough to train on a laptop CPU in minutes (tests, demos)."""
    backbone = BackboneConfig(
        pretrained=None,
        arch={
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "hidden_act": "quick_gelu",
        },
        unfreeze_last_n=2,
    )
    if segmenter == "segformer":
        seg = SegmenterConfig(
            kind="segformer",
            pretrained=None,
            arch={
                "model_type": "segformer",
                "num_labels": NUM_ADE20K_CLASSES,
                "hidden_sizes": [8, 16, 24, 32],
                "depths": [1, 1, 1, 1],
                "num_attention_heads": [1, 1, 2, 2],
                "decoder_hidden_size": 32,
            },
            input_size=64,
        )
    elif segmenter == "oneformer":
        seg = SegmenterConfig(kind="oneformer", pretrained=None, arch=TINY_ONEFORMER_ARCH, input_size=64)
    elif segmenter == "small":
        seg = SegmenterConfig(kind="small", pretrained=None, arch=copy.deepcopy(SMALL_SEGMENTER_ARCH), input_size=64)
    else:
        seg = SegmenterConfig(kind="none", pretrained=None)
    return ModelConfig(
        backbone=backbone,
        segmenter=seg,
        fusion=FusionConfig(query_dim=32, latent_dim=16, heads=2, blocks=2),
    ).validate()


TINY_ONEFORMER_ARCH: dict[str, Any] = {
    "model_type": "oneformer",
    "backbone_config": {
        "model_type": "swin",
        "embed_dim": 16,
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 2, 2],
        "window_size": 4,
        "image_size": 64,
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    },
    "num_queries": 8,
    "num_labels": NUM_ADE20K_CLASSES,
    "hidden_dim": 32,
    "conv_dim": 32,
    "mask_dim": 32,
    "encoder_feedforward_dim": 64,
    "dim_feedforward": 64,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "num_attention_heads": 2,
    "text_encoder_width": 32,
    "text_encoder_num_layers": 1,
    "text_encoder_proj_layers": 1,
    "text_encoder_n_ctx": 4,
    "query_dec_layers": 1,
    "norm": "GN",
}

PRESETS = {"full": full_config, "tiny": tiny_config}
