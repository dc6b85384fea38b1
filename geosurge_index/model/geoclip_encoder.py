"""GeoCLIP (Vivanco et al., NeurIPS 2023, MIT) as encoders of this index.

- `GeoClipImageEncoder`: CLIP ViT-L/14's projected image features (`CLIPModel.get_image_features`,
  here `CLIPVisionModelWithProjection`, which reads the same checkpoint without the text tower) ->
  GeoCLIP's MLP head (768 -> 768 -> 512) -> L2-normalised 512-d embedding. The visual encoder of an
  index imported with `geosurge import geoclip` (encoder kind "geoclip"): its CLIP tower is named in
  encoder.json (hub id or folder) and loaded with `from_pretrained` from local files only; only
  the head travels in encoder.safetensors.
- `GeoClipLocationEncoder`: GeoCLIP's location encoder (Equal Earth projection, random Fourier
  features at 3 scales, one MLP per scale, summed -> 512-d), computing exactly what the `geoclip`
  package computes, so the index's cell embeddings and the GPS gallery need no `geoclip` import.
  Its weights come from the `geoclip` wheel (`importers.geoclip` finds them).

Both reproduce the `geoclip` package's numbers for the same inputs (tests compare them with the
package itself).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geosurge_index.errors import FormatError, UserError

KIND = "geoclip"
EMBED_DIM = 512
CLIP_PROJECTION = 768  # the width of CLIP ViT-L/14's image features, the head's input
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
IMAGE_SIZE = 224  # GeoCLIP's input (CLIP's 224 px processor)
LICENCE = "MIT"

# Equal Earth projection constants (Šavrič, Patterson & Jenny 2018), as GeoCLIP uses them.
_A1, _A2, _A3, _A4, _SF = 1.340264, -0.081106, 0.000893, 0.003796, 66.50336
LOCATION_SIGMAS = (2.0**0, 2.0**4, 2.0**8)


# --- the location encoder -------------------------------------------------------------------------

def equal_earth(latlon: torch.Tensor) -> torch.Tensor:
    """(n, 2) degrees (lat, lon) -> (n, 2) GeoCLIP's scaled Equal Earth coordinates (x, y)."""
    lat, lon = torch.deg2rad(latlon[:, 0]), torch.deg2rad(latlon[:, 1])
    sqrt3 = torch.sqrt(torch.tensor(3.0, dtype=latlon.dtype, device=latlon.device))
    theta = torch.asin((sqrt3 / 2) * torch.sin(lat))
    denominator = 3 * (9 * _A4 * theta**8 + 7 * _A3 * theta**6 + 3 * _A2 * theta**2 + _A1)
    x = (2 * sqrt3 * lon * torch.cos(theta)) / denominator
    y = _A4 * theta**9 + _A3 * theta**7 + _A2 * theta**3 + _A1 * theta
    return (torch.stack((x, y), dim=1) * _SF) / 180


class FourierFeatures(nn.Module):
    """gamma(v) = (cos 2 pi B v, sin 2 pi B v) with a fixed (256, 2) Gaussian matrix B."""

    def __init__(self, encoded: int = 256):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(encoded, 2), requires_grad=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        vp = 2 * math.pi * v @ self.b.T
        return torch.cat((torch.cos(vp), torch.sin(vp)), dim=-1)


class _Capsule(nn.Module):
    """One scale: Fourier features -> 3 x (Linear 1024, ReLU) -> Linear 512 (GeoCLIP's layout and
    state-dict names, so its weight file loads strictly)."""

    def __init__(self):
        super().__init__()
        self.capsule = nn.Sequential(FourierFeatures(), nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                     nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(1024, 512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.capsule(x))


class GeoClipLocationEncoder(nn.Module):
    """(n, 2) float32 degrees (lat, lon) -> (n, 512) GeoCLIP location features (not normalised,
    as GeoCLIP's `LocationEncoder.forward`; `embed` gives the unit vectors the index uses)."""

    def __init__(self, n_scales: int = len(LOCATION_SIGMAS)):
        super().__init__()
        self.n = n_scales
        for i in range(n_scales):
            self.add_module(f"LocEnc{i}", _Capsule())

    @classmethod
    def from_state_dict(cls, state: dict, where: str | os.PathLike = "location encoder weights"):
        n = len({k.split(".")[0] for k in state if k.startswith("LocEnc")})
        enc = cls(n)
        try:
            enc.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise FormatError(f"{where}: not GeoCLIP location-encoder weights ({str(err).splitlines()[0]})") from err
        return enc.eval()

    def forward(self, latlon: torch.Tensor) -> torch.Tensor:
        x = equal_earth(latlon)
        out = torch.zeros(x.shape[0], EMBED_DIM, device=x.device)
        for i in range(self.n):
            out += self._modules[f"LocEnc{i}"](x)
        return out

    @torch.inference_mode()
    def embed(self, lat, lon, *, batch_size: int = 4096, progress: bool = False) -> np.ndarray:
        """Degrees -> float32 (n, 512) L2-normalised location embeddings, in batches."""
        from geosurge_index.progress import bar

        pts = torch.as_tensor(np.stack([np.asarray(lat, np.float32), np.asarray(lon, np.float32)], axis=1))
        out = np.empty((len(pts), EMBED_DIM), np.float32)
        starts = range(0, len(pts), batch_size)
        for s in bar(starts, desc="location embeddings", unit="batch") if progress else starts:
            out[s:s + batch_size] = F.normalize(self(pts[s:s + batch_size]), dim=1).numpy()
        return out


# --- the image encoder ----------------------------------------------------------------------------

def image_head() -> nn.Sequential:
    """GeoCLIP's MLP on CLIP's image features (state-dict names `0.*`, `2.*` as in its weight file)."""
    return nn.Sequential(nn.Linear(CLIP_PROJECTION, CLIP_PROJECTION), nn.ReLU(), nn.Linear(CLIP_PROJECTION, EMBED_DIM))


def clip_vision_config(source: str, *, allow_download: bool = False, what: str = "--clip"):
    """The CLIP vision config of `source` (a folder or hub id), with the projection width of a full
    CLIP checkpoint carried over. UserError, saying what to run, when it is not available locally;
    UserError when it is not a CLIP ViT with 768-d projected features (what GeoCLIP's head takes)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(source, local_files_only=not allow_download)
    except Exception as err:  # noqa: BLE001 - OSError, hub errors, ValueError ...
        raise UserError(clip_missing_message(source, what, err)) from err
    kind = getattr(cfg, "model_type", None)
    if kind == "clip":
        vision = cfg.vision_config
        vision.projection_dim = cfg.projection_dim  # a CLIPModel keeps it at the top level
    elif kind == "clip_vision_model":
        vision = cfg
    else:
        raise UserError(f"{what} {source!r} is a {kind!r} model, not CLIP: GeoCLIP's image tower is "
                        f"CLIP ViT-L/14 ({DEFAULT_CLIP})")
    if int(vision.projection_dim) != CLIP_PROJECTION:
        raise UserError(f"{what} {source!r} projects images to {vision.projection_dim}-d features; GeoCLIP's "
                        f"head takes CLIP ViT-L/14's {CLIP_PROJECTION}-d features ({DEFAULT_CLIP})")
    if int(vision.image_size) != IMAGE_SIZE:
        raise UserError(f"{what} {source!r} takes {vision.image_size} px images; GeoCLIP's head was trained on "
                        f"CLIP ViT-L/14 at {IMAGE_SIZE} px ({DEFAULT_CLIP})")
    return vision


def clip_missing_message(source: str, what: str, err: Exception) -> str:
    local = Path(source).expanduser().exists() or str(source).startswith((".", "/", "~"))
    if local:
        return (f"{what} {source!r} could not be read as a CLIP model folder ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}): give a folder written by save_pretrained "
                f"(config.json + weights)")
    return (f"{what} {source!r} is not in the Hugging Face cache and downloads are off. Run once:\n"
            f"  geosurge import geoclip --out INDEX --clip {source} --allow-download\n"
            f"or fetch it yourself (`huggingface-cli download {source}`), or pass --clip a local folder.")


def load_clip_vision(source: str, *, allow_download: bool = False, what: str = "--clip"):
    """`CLIPVisionModelWithProjection.from_pretrained` (local files only unless `allow_download`);
    reads a full CLIPModel checkpoint too (the text tower is skipped)."""
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    vision = clip_vision_config(source, allow_download=allow_download, what=what)
    # transformers' loading report would list the checkpoint's text tower as unexpected keys:
    # expected here (it is never used)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(source, config=vision,
                                                              local_files_only=not allow_download)
    except Exception as err:  # noqa: BLE001
        raise UserError(clip_missing_message(source, what, err)) from err
    finally:
        hf_logging.set_verbosity(level)
    return model


class GeoClipImageEncoder(nn.Module):
    """`encoder(pixel_values (B,3,S,S) CLIP-normalised, class_map ignored) -> (B, 512)` unit norm:
    GeoCLIP's image features (its `ImageEncoder.forward`), normalised as GeoCLIP does before its
    cosine similarities. The index's encoder contract (`model.load_encoder`)."""

    kind = KIND

    def __init__(self, clip, head: nn.Module | None = None, *, clip_source: str = DEFAULT_CLIP,
                 clip_revision: str | None = None, provenance: dict | None = None):
        super().__init__()
        self.clip = clip
        self.mlp = head if head is not None else image_head()
        self.image_size = int(clip.config.image_size)
        self.embed_dim = EMBED_DIM
        self.clip_source = clip_source
        self.clip_revision = clip_revision
        self.provenance = dict(provenance or {})
        for p in self.clip.parameters():
            p.requires_grad_(False)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """GeoCLIP's unnormalised image features (`geoclip.ImageEncoder.forward`)."""
        return self.mlp(self.clip(pixel_values=pixel_values).image_embeds)

    def forward(self, pixel_values: torch.Tensor, class_map: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.features(pixel_values), dim=-1)

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        """What encoder.safetensors holds: the head (the CLIP tower is named, never copied)."""
        return {f"mlp.{k}": v.detach().contiguous() for k, v in self.mlp.state_dict().items()}

    def encoder_json(self) -> dict:
        """The kind-specific fields of encoder.json (`encoder_io.save_encoder` adds the header)."""
        return {"kind": KIND, "image_size": self.image_size, "embed_dim": self.embed_dim,
                "clip": {"source": self.clip_source, "revision": self.clip_revision},
                "provenance": self.provenance, "licence": self.provenance.get("licence", LICENCE)}


def load_geoclip_encoder(meta: dict, state: dict, where: Path, *, weights: bool = True) -> GeoClipImageEncoder:
    """encoder.json (kind "geoclip") + encoder.safetensors -> the encoder; the CLIP tower from
    local files only (an index never downloads). weights=False: a config-built tower (random
    weights), for tests and tools that need only shapes."""
    clip_meta = meta.get("clip") or {}
    source = clip_meta.get("source")
    if not isinstance(source, str):
        raise FormatError(f"{where}/encoder.json names no CLIP tower (clip.source)")
    if weights:
        clip = load_clip_vision(source, what="the index's CLIP tower")
    else:
        from transformers import CLIPVisionModelWithProjection

        clip = CLIPVisionModelWithProjection(clip_vision_config(source, what="the index's CLIP tower"))
    head = image_head()
    try:
        head.load_state_dict({k[len("mlp."):]: v for k, v in state.items() if k.startswith("mlp.")}, strict=True)
    except RuntimeError as err:
        raise FormatError(f"{where}/encoder.safetensors: not a GeoCLIP image head "
                          f"({str(err).splitlines()[0]})") from err
    if int(meta.get("embed_dim", EMBED_DIM)) != EMBED_DIM:
        raise FormatError(f"{where}/encoder.json: a GeoCLIP encoder is {EMBED_DIM}-d, not {meta.get('embed_dim')}")
    return GeoClipImageEncoder(clip, head, clip_source=source, clip_revision=clip_meta.get("revision"),
                               provenance=meta.get("provenance"))
