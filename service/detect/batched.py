"""Batched SCRFD for the GPU path: the exports' outputs rewritten to keep a batch axis, and a batch detect.

insightface's SCRFD exports end each of their 9 heads with ``Transpose(perm=[2,3,0,1])`` (NCHW -> HWNC) and
``Reshape([-1, C])``: the batch is flattened *into* the anchor axis, interleaved per cell, and the input's batch
is fixed at 1. ``batch_axis_model`` rewrites those tails to ``Transpose(perm=[0,2,3,1])`` (NHWC) and
``Reshape([0, -1, C])``, so each output is [N, anchors, C] in the same anchor order as before, and frees the
input's batch dimension. One image in gives exactly the original numbers.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from crfiqa.service.detect.base import DetectorSettings
from crfiqa.service.detect.scrfd import SCRFD
from crfiqa.service.errors import ModelError
from crfiqa.service.registry import DetectorSpec
from crfiqa.service.results import Detection
from crfiqa.service.runtime import create_session

HWNC = [2, 3, 0, 1]
NHWC = [0, 2, 3, 1]


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """Value of an initializer or Constant output ``name``."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def batch_axis_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an SCRFD model whose outputs are [N, anchors, C] and whose input batch is free."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producer = {o: n for n in g.node for o in n.output}
    for output in g.output:
        node = producer[output.name]
        reshape = producer[node.input[0]] if node.op_type == "Sigmoid" else node  # scores: Reshape -> Sigmoid
        transpose = producer.get(reshape.input[0]) if reshape.op_type == "Reshape" else None
        perm = [a.ints for a in transpose.attribute if a.name == "perm"] if transpose is not None else []
        shape = _constant(g, reshape.input[1]) if reshape.op_type == "Reshape" else None
        if transpose is None or transpose.op_type != "Transpose" or not perm or list(perm[0]) != HWNC \
                or shape is None or shape.tolist()[:1] != [-1] or len(shape) != 2:
            raise ModelError(f"output {output.name}: not an SCRFD head tail (Transpose{HWNC} -> Reshape[-1, C])",
                             code="bad_model")
        del transpose.attribute[:]
        transpose.attribute.append(onnx.helper.make_attribute("perm", NHWC))
        # A fresh shape tensor per Reshape: the exports share one between heads of equal width.
        name = f"{reshape.output[0]}_batched_shape"
        g.initializer.append(numpy_helper.from_array(np.array([0, -1, int(shape[1])], dtype=np.int64), name))
        reshape.input[1] = name
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = "N"
        dims.add().dim_param = "anchors"
        dims.add().dim_value = int(shape[1])
    g.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    del g.value_info[:]  # shapes inferred with batch 1 baked in
    onnx.checker.check_model(out)
    return out


class BatchedSCRFD(SCRFD):
    """SCRFD that also detects in a list of images with one network run (``detect_batch``).

    Images of one batch share the network input shape (same size, or a fixed ``input_size``), so one array holds
    them; per image, decoding, NMS and the size/cap filters are the per-image detector's own."""

    def __init__(self, path: Path, settings: DetectorSettings, providers: Sequence[str],
                 intra_op_threads: int = 0, spec: DetectorSpec | None = None, *, solo_threads: int = 0) -> None:
        super().__init__(path, settings, providers, intra_op_threads, spec, solo_threads=solo_threads)
        model = batch_axis_model(onnx.load(str(path)))
        with tempfile.TemporaryDirectory() as tmp:  # ORT reads the whole file at session creation
            rewritten = Path(tmp) / Path(path).name
            onnx.save(model, str(rewritten))
            self.batch_session = create_session(rewritten, providers, intra_op_threads, solo_threads)
        self.batch_output_names = [o.name for o in self.batch_session.get_outputs()]
        self._ready = threading.local()  # per thread: (image, its raw detections) while detect_batch finishes it

    def detect_batch(self, images: Sequence[np.ndarray], settings: DetectorSettings | None = None
                     ) -> list[list[Detection]]:
        """Faces of each RGB image (ordered, filtered and capped as ``detect``), one network run for all."""
        s = settings or self.settings
        if not images:
            return []
        prepared = [self._blob(rgb, s) for rgb in images]
        shapes = {(b.shape[2], b.shape[3]) for b, *_ in prepared}
        if len(shapes) != 1:
            raise ValueError(f"a batch needs one network input shape, got {sorted(shapes)}: group images by size "
                             "or set a fixed input_size")
        return self._run_batch(images, prepared, s)

    def detect_many(self, images: Sequence[np.ndarray], settings: DetectorSettings | None = None
                    ) -> list[list[Detection]]:
        """Faces of each RGB image of any sizes: one network run per distinct network input shape."""
        s = settings or self.settings
        prepared = [self._blob(rgb, s) for rgb in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (blob, *_) in enumerate(prepared):
            groups.setdefault((blob.shape[2], blob.shape[3]), []).append(i)
        out: list[list[Detection]] = [[] for _ in images]
        for idx in groups.values():
            for i, faces in zip(idx, self._run_batch([images[i] for i in idx], [prepared[i] for i in idx], s)):
                out[i] = faces
        return out

    def _run_batch(self, images: Sequence[np.ndarray], prepared: list, s: DetectorSettings) -> list[list[Detection]]:
        """One network run over blobs of one shape, then each image finished by the per-image code."""
        outs = self.batch_session.run(self.batch_output_names,
                                      {self.input_name: np.concatenate([b for b, *_ in prepared])})
        results = []
        for i, (rgb, (_, scale, net_h, net_w)) in enumerate(zip(images, prepared)):
            # ``detect`` (the shared ordering, filters, cap and pre-cropped retry) takes this image's raw
            # detections from the batch run instead of running the network again.
            self._ready.faces = (rgb, self._postprocess([o[i] for o in outs], scale, net_h, net_w, s))
            try:
                results.append(self.detect(rgb, s))
            finally:
                self._ready.faces = None
        return results

    def _detect(self, rgb: np.ndarray, s: DetectorSettings) -> list[Detection]:
        """The batch run's detections for the image ``detect_batch`` is finishing, else a network run."""
        ready = getattr(self._ready, "faces", None)
        if ready is not None and ready[0] is rgb:
            self._ready.faces = None  # once: the pre-cropped retry (a padded copy) runs the network
            return ready[1]
        return super()._detect(rgb, s)
