"""
Export a trained model to ONNX, for a device: the student.pt (or teacher.pt) a training script wrote -- the ViT
with its adapters merged, and its head -- as one .onnx file that ONNX Runtime, TensorRT and the like run. The
batch size is free, the image size fixed (the size it trained at, or --img_size): the position embeddings are
resampled for that size here, in torch, so the graph holds no interpolation of them, which is what breaks
exports of DINOv2 (dinov2 issues #167, #216). The file carries what prediction needs as ONNX metadata (class
names, image size, preprocessing, task), and is run in ONNX Runtime against torch before it is written.

    python export_onnx.py out/RUN/student.pt                   # writes out/RUN/student.onnx
    python export_onnx.py out/RUN/student.pt --out student.onnx --img_size 518 --opset 17

Input "images": float32 (batch, 3, S, S), RGB, (pixel / 255 - mean) / std, after the resize and crop the
metadata's "preprocess" says. Output "logits": (batch, classes), or for a segmenter (batch, classes, S, S) of one
S x S window (slide it over a larger image, stride S / 2, and average, as predict.py does).
"""

import argparse
import copy
import inspect
import io
import json
import logging
import os
import sys
import warnings

import numpy as np
import torch

from deploy import fix_size, input_size, load_model
from flags import FlagError, POSITIVE_INT, Parser
from model import Segmenter
from run_folder import RunError, atomic_write
from weights import CheckpointError

TOLERANCE = 1e-4  # the most ONNX Runtime's logits may differ from torch's in float32, for logits up to 1 in size
# the opsets both of torch's exporters write as asked: below 17 (no LayerNormalization) torch >= 2.9's writes 18
# instead, and torch < 2.9's TorchScript one writes none above 20
OPSETS = range(17, 21)


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a student.pt or teacher.pt written by train_slad.py or train_twostep.py")
    p.add_argument("--out", help="the .onnx file (default: the model's path, .pt replaced by .onnx)")
    p.add_argument("--img_size", type=POSITIVE_INT,
                   help="the input's side, a multiple of the patch size, 14 for DINOv2 and 16 for DINOv3 (default: "
                        "the size the model trained at)")
    p.add_argument("--opset", type=POSITIVE_INT, default=18,
                   help=f"the ONNX opset, {OPSETS[0]} to {OPSETS[-1]} (18: torch's exporter needs no conversion; 17 "
                        f"for TensorRT 8)")
    args = p.parse_args(argv)
    if args.opset not in OPSETS:
        p.error(f"--opset {args.opset}: torch's exporters write this model at opsets {OPSETS[0]} to {OPSETS[-1]} "
                f"alone (ViT blocks need opset 17's LayerNormalization): give one of them, 17 for TensorRT 8")
    return args, p


def to_onnx(net, x, opset):
    """The ONNX model (an onnx.ModelProto) of net on inputs shaped as x, the batch size free: through torch.export
    where torch exports so by default (torch >= 2.9; it needs onnxscript), through TorchScript before."""
    import onnx
    names = dict(input_names=["images"], output_names=["logits"], opset_version=opset)
    dynamo = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    with warnings.catch_warnings():  # the exporters' deprecation and tracer notes: the check below is what counts
        warnings.simplefilter("ignore")
        if dynamo is not None and dynamo.default is True:
            logging.disable(logging.WARNING)  # its notes on converting opset 18 to the one asked: main checks that
            try:
                program = torch.onnx.export(net, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                            verbose=False, **names)
            finally:
                logging.disable(logging.NOTSET)
            return program.model_proto
        f = io.BytesIO()
        torch.onnx.export(net, (x,), f, dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, **names)
        return onnx.load_model_from_string(f.getvalue())


def max_difference(session, model, img_size, batches=(1, 3)):
    """(the largest |ONNX Runtime - torch|, the largest |torch|) over the logits of random inputs, at two batch
    sizes, the graph in an onnxruntime.InferenceSession."""
    g, worst, largest = torch.Generator().manual_seed(0), 0.0, 0.0
    for b in batches:
        x = torch.randn(b, 3, img_size, img_size, generator=g)
        with torch.no_grad():
            expected = model(x).numpy()
        worst = max(worst, float(np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max()))
        largest = max(largest, float(np.abs(expected).max()))
    return worst, largest


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def main(argv=None):
    import onnx
    args, p = parse_args(argv)
    model = load_model(args.model)  # eval mode, as predicted; model.meta: what prediction needs
    meta = dict(model.meta)
    try:
        img_size = input_size(model, args.model, args.img_size)
    except FlagError as e:
        p.error(str(e))
    out = args.out or os.path.splitext(args.model)[0] + ".onnx"

    # the graph: the model fixed to img_size, its batch size free
    fixed = copy.deepcopy(model)
    fix_size(fixed.vit, img_size)
    proto = to_onnx(fixed, torch.randn(2, 3, img_size, img_size), args.opset)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset != args.opset:  # an exporter that cannot convert to the opset asked keeps its own, and only warns
        sys.exit(f"error: torch's exporter wrote opset {opset}, not the --opset {args.opset} asked: {out} is not "
                 f"written; give --opset {opset}")
    meta.update(img_size=img_size, source=os.path.basename(args.model), tolerance=TOLERANCE)
    meta.setdefault("classes", [str(k) for k in range(model.num_classes)])
    meta.setdefault("task", "segmentation" if isinstance(model, Segmenter) else "classification")
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    try:
        onnx_bytes = proto.SerializeToString()
    except ValueError:  # protobuf's 2 GB limit: ViT-g
        p.error(f"{args.model} is over 2 GB in ONNX, the most one .onnx file holds: export a smaller model")

    # checked in ONNX Runtime against the model as loaded (its own position-embedding resampling), then written
    import onnxruntime as ort
    try:
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own kinds (InvalidGraph, Fail, ...) derive from Exception alone
        sys.exit(f"error: ONNX Runtime cannot load the opset {opset} graph torch's exporter wrote "
                 f"({str(e).strip().splitlines()[0][:160]}): {out} is not written; give another --opset, 18 the "
                 f"exporter's own")
    diff, largest = max_difference(session, model, img_size)
    if not diff <= TOLERANCE * max(1.0, largest):  # float32 rounding grows with the logits
        sys.exit(f"error: ONNX Runtime's logits differ from torch's by up to {diff:.2e}, more than float32 rounding "
                 f"({TOLERANCE} for logits up to {max(1.0, largest):.3g}): {out} is not written")
    atomic_write(out, lambda tmp: write_bytes(tmp, onnx_bytes), "or give another --out, then run export_onnx.py again")
    shape = "(batch, classes, S, S)" if meta["task"] == "segmentation" else "(batch, classes)"
    classes = f"{len(meta['classes'])} class{'' if len(meta['classes']) == 1 else 'es'}"
    print(f"wrote {out} ({len(onnx_bytes) / 2**20:.1f} MB, opset {opset}): {meta['task']}, "
          f"{classes}, input (batch, 3, {img_size}, {img_size}) as its metadata says, logits "
          f"{shape}; ONNX Runtime vs torch: max |logit difference| {diff:.1e} at batch sizes 1 and 3")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, RunError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130, a shell's exit status for it
        print("export_onnx.py: interrupted", file=sys.stderr)
        sys.exit(130)
