"""int8 versions of the exported fp32 encoder graph (ONNX Runtime's quantisation tools).

Two recipes, measured in `geosurge bench cpu` (docs/cpu-inference.md has the table):

  static   QDQ int8 with calibration: weights per output channel (int8, symmetric), activations
           uint8 with ranges fixed from calibration photos (MinMax), `reduce_range` off (this CPU
           has AVX-512 VNNI). No per-call activation quantisation, so it is the faster one at
           batch 8, and on the trained demo index the closer one to torch fp32.
  dynamic  int8 weights per output channel, activations quantised per call: needs no photos.

Both quantise only CLIP's weight MatMuls (`backbone_weight_matmuls`: q/k/v/out projections and
the MLP, about 99% of the FLOPs at full size). Left in fp32, because quantising them moved the
answers on the demo index more than their cost is worth: the patch-embedding Conv (it sees raw
pixels), the attention MatMuls between two activations, the fusion module and the read-out head
(LayerNorm + Linear), all small.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

INT8_METHODS = ("static", "dynamic")
OP_TYPES = ["MatMul", "Gemm", "Conv"]  # quantisable here; `nodes` chooses among them
BACKBONE_PREFIX = "/backbone/"  # node-name prefix of CLIP in the TorchScript export of `_EncoderGraph`


def backbone_weight_matmuls(model) -> list[str]:
    """The names of the MatMul nodes of CLIP whose second input is a weight (an initializer)."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.name.startswith(BACKBONE_PREFIX) and n.input[1] in weights]


class _Reader:
    """A CalibrationDataReader over feeds ({input: (n, ...) array}) in batches of `batch`."""

    def __init__(self, feed: Mapping[str, np.ndarray], batch: int = 8):
        n = len(next(iter(feed.values())))
        self.items = [{k: np.ascontiguousarray(v[i:i + batch]) for k, v in feed.items()} for i in range(0, n, batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def rewind(self):
        self.i = 0


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, method: str = "static", *,
                  calibration: Mapping[str, np.ndarray] | None = None, per_channel: bool = True,
                  nodes: Iterable[str] | None = None) -> dict:
    """Write the int8 graph of the fp32 ONNX file `src` to `dst`. `calibration`: the graph's inputs
    for the static recipe (a few dozen representative photos). `nodes`: the nodes to quantise
    (default `backbone_weight_matmuls`). -> a description of what was done (for the manifest)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if method not in INT8_METHODS:
        raise ValueError(f"int8 method {method!r}: choose one of {', '.join(INT8_METHODS)}")
    nodes = list(backbone_weight_matmuls(onnx.load(str(src), load_external_data=False))
                 if nodes is None else nodes)
    # DefaultTensorType: shape inference does not type every intermediate of the traced graph
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    large = Path(src).stat().st_size > 1.9e9  # past protobuf's 2 GB: weights as external data
    if method == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         nodes_to_quantize=nodes, op_types_to_quantize=OP_TYPES, extra_options=extra,
                         use_external_data_format=large)
        return {"method": "dynamic", "per_channel": per_channel, "nodes": len(nodes)}
    if not calibration:
        raise ValueError("static int8 needs calibration inputs")
    n = len(next(iter(calibration.values())))
    quantize_static(str(src), str(dst), _Reader(calibration), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=OP_TYPES, nodes_to_quantize=nodes, per_channel=per_channel,
                    reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
                    use_external_data_format=large)
    return {"method": "static", "per_channel": per_channel, "nodes": len(nodes), "calibration_images": n,
            "calibration": "minmax", "activations": "uint8", "reduce_range": False}
