"""The mapper stage: encoder + index on one device. `Predictor.encode`: uint8 pixels -> L2-normalised
embeddings (normalisation on the device; on CUDA autocast in `devices.autocast_dtype` (bf16 where the
GPU has it natively, else fp16) and pinned, non-blocking copies;
precomputed class maps skip the segmenter); `Predictor.predict`: a `DecodedBatch` -> PRED_DIR rows
through the index's search, with an error row for every input that could not be decoded."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa

from geosurge_index.devices import autocast_dtype, resolve_device  # resolve_device: also its old home
from geosurge_index.errors import FormatError, UserError
from geosurge_index.geometry import clip_normalise
from geosurge_index.locate.decode import TEN_CROPS, DecodedBatch
from geosurge_index.privacy import Cap, apply_cap


@dataclass(frozen=True)
class SearchSettings:
    top_k: int = 5
    beam: int | str | None = None  # None: the index's default; "4,4,8,8,8,8": one per level
    save_embeddings: bool = False
    ten_crop: bool = False  # pixels come as 10 crops per image; the embedding is their normalised mean
    cap: Cap | None = None  # precision cap applied to the rows (`privacy.apply_cap`)
    galleries: str | None = None  # the index's galleries that refine the point: None all, "none", "a,b"
    refine_cells: int | None = None  # best finest cells whose references are searched (0: none; None: the index's)


def embedding_dim(encoder, index) -> int | None:
    """The embedding width, from the encoder's config (`encoder.embed_dim`) and the index's tables
    (`index.dim`); FormatError when they disagree, None when neither says."""
    enc = getattr(encoder, "embed_dim", None)
    if enc is None:
        enc = getattr(getattr(encoder, "config", None), "embed_dim", None)
    idx = getattr(index, "dim", None) if index is not None else None
    if enc is not None and idx is not None and int(enc) != int(idx):
        raise FormatError(f"the encoder makes {int(enc)}-d embeddings but the index's cell tables are "
                          f"{int(idx)}-d: they come from different models")
    dim = enc if enc is not None else idx
    return None if dim is None else int(dim)


class Predictor:
    """Encoder + index on one device: DecodedBatch -> PRED_DIR rows (a pyarrow Table)."""

    def __init__(self, encoder, index, device, settings: SearchSettings = SearchSettings(),
                 precision: str = "auto", confidence=None):
        import torch

        self.encoder = encoder.eval()
        self.index = index
        self.device = torch.device(device)
        self.amp_dtype = autocast_dtype(self.device, precision)  # None: fp32
        self.settings = settings
        self._embed_dim = embedding_dim(encoder, index)  # checked here: before any image is decoded
        self.image_size = int(encoder.image_size)
        if hasattr(index, "use_galleries"):  # galleries: which refine the point, and how (gallery.refine)
            from geosurge_index.gallery.refine import RefineSettings

            index.use_galleries(settings.galleries, None if settings.refine_cells is None
                                else RefineSettings(cells=settings.refine_cells))
        from geosurge_index.confidence import ConfidenceModel

        # `confidence.ConfidenceModel`: calibrated when the index carries a calibration
        self.confidence = confidence or (ConfidenceModel.for_index(index) if hasattr(index, "tree") else None)

    @classmethod
    def open(cls, index_dir, device="auto", settings: SearchSettings = SearchSettings(),
             runtime: str = "auto") -> Predictor:
        """The index and its encoder. `runtime` (the setting of that name: auto, torch, onnx,
        onnx-fp32, onnx-int8) chooses torch or an ONNX Runtime encoder (`model.onnx_runtime`);
        `predictor.encoder.runtime` names the one that runs."""
        from geosurge_index.index import GeoIndex
        from geosurge_index.model.onnx_runtime import open_encoder

        dev = resolve_device(device)
        index = GeoIndex.open(index_dir, device=str(dev))
        if not index.has_encoder:
            raise UserError(f"INDEX_DIR {index_dir} was exported without a visual encoder: it can search "
                            "stored embeddings (`geosurge search`) but cannot locate images")
        return cls(open_encoder(index_dir, dev, runtime, index.manifest), index, dev, settings)

    def encode(self, pixels, class_maps, has_map: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S, 3) + class maps (n, S, S) -> float32 (n, D) embeddings. With
        `settings.ten_crop`: uint8 (n, 10, S, S, 3) + maps (n, 10, S, S) -> the L2-normalised
        mean of each image's 10 crop embeddings (`model.embed_ten_crop`)."""
        import torch

        from geosurge_index.model.inference import embed_ten_crop

        n = pixels.shape[0]
        s = self.image_size
        crops = TEN_CROPS if self.settings.ten_crop else 1
        want = (crops, s, s, 3) if crops > 1 else (s, s, 3)
        if tuple(pixels.shape[1:]) != want:
            raise ValueError(f"pixels are {tuple(pixels.shape)}, the encoder takes (n, {', '.join(map(str, want))})")
        cuda = self.device.type == "cuda"
        # uint8 crosses to the device (4x less than float32; non-blocking from pinned memory),
        # normalisation runs there.
        pixels = torch.as_tensor(pixels).to(self.device, non_blocking=cuda)
        has = torch.as_tensor(np.asarray(has_map, dtype=bool))
        maps = torch.as_tensor(class_maps).to(self.device, non_blocking=cuda) if bool(has.any()) else None
        x = clip_normalise(pixels.reshape(n * crops, s, s, 3))
        if crops > 1:
            x = x.view(n, crops, 3, s, s)
            encoder = partial(embed_ten_crop, self.encoder)
        else:
            encoder = self.encoder
        out = None
        amp = self.amp_dtype is not None
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                                    enabled=amp):
            # Images with a precomputed class map skip the segmenter; the others run it once.
            for with_map in (True, False):
                sel = torch.nonzero(has == with_map).flatten()
                if len(sel) == 0:
                    continue
                idx = sel.to(self.device)
                whole = len(sel) == n  # the usual case: no gather copy
                cmap = (maps if whole else maps.index_select(0, idx)).long() if with_map else None
                emb = encoder(x if whole else x.index_select(0, idx), cmap).float()
                if out is None:
                    out = torch.empty((n, emb.shape[1]), dtype=torch.float32, device=self.device)
                out[idx] = emb
        if out is None:
            return np.zeros((0, 0), np.float32)
        return out.cpu().numpy()

    def predict(self, batch: DecodedBatch, ids, paths) -> pa.Table:
        """The encoder and search stages for one batch: PRED_DIR rows, error rows included."""
        return self.predict_full(batch, ids, paths)[0]

    def predict_full(self, batch: DecodedBatch, ids, paths):
        """-> (PRED_DIR rows, SearchResult of the decoded rows or None, their embeddings or None)."""
        from geosurge_index.confidence import search
        from geosurge_index.search import result_to_arrow

        emb = result = conf = None
        if batch.ok.any():
            emb = self.encode(batch.pixels, batch.class_maps, batch.has_map)
            kwargs = {} if self.settings.beam is None else {"beam": self.settings.beam}
            if self.confidence is not None:
                result, conf = search(self.index, self.confidence, emb, self.settings.top_k, **kwargs)
            else:
                result = self.index.search(emb, top_k=self.settings.top_k, **kwargs)
        saved = None
        if self.settings.save_embeddings:  # the column exists even when every input failed
            saved = emb if emb is not None else np.zeros((0, self.embed_dim), np.float32)
        ok = batch.ok
        table = result_to_arrow(
            result, self.index.tree, ids, paths, batch.errors, saved,
            widths=[int(w) if o else None for w, o in zip(batch.width, ok, strict=True)],
            heights=[int(h) if o else None for h, o in zip(batch.height, ok, strict=True)],
            confidence=conf,
            gps=batch.gps,
        )
        table = apply_cap(table, self.index.tree, self.settings.cap)
        return table, result, emb

    @property
    def embed_dim(self) -> int:
        """The embedding width (the encoder's config, else the index's tables)."""
        if self._embed_dim is None:
            raise ValueError("the embedding width is unknown: the encoder has no `embed_dim` (nor "
                             "`config.embed_dim`) and there is no index")
        return self._embed_dim

