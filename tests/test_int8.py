"""vitgraph.deploy.int8: the static INT8 graph onnxruntime's CPU kernels run fast."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from vitgraph.deploy.export import export_onnx
from vitgraph.deploy.int8 import quantize_int8
from vitgraph.models import load_model

KWARGS = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 3}


def test_int8_keeps_attention_matmuls_float_and_quantizes_activations_to_uint8(tmp_path):
    model, x = load_model("vit_tiny_patch16_224", model_args=KWARGS)
    export_onnx(model, tmp_path / "m.onnx", (x,))
    torch.manual_seed(0)
    calib = [(torch.randn(4, 3, 16, 16), None) for _ in range(2)]
    quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", calib)
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def from_weight(name: str) -> bool:  # a (dequantized) initializer, not an activation
        n = producer.get(name)
        return name in inits or (n is not None and n.op_type == "DequantizeLinear" and n.input[0] in inits)

    matmuls = [n for n in g.node if n.op_type == "MatMul"]
    act_act = [n for n in matmuls if not any(from_weight(i) for i in n.input)]
    weighted = [n for n in matmuls if any(from_weight(i) for i in n.input)]
    assert len(act_act) == 2 * KWARGS["depth"]  # q @ k^T and attn @ v of every block
    # activation x activation MatMuls stay float: their Q/DQ pairs cost more than int8 saves
    for n in act_act:
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in n.input), n.name
    # weight MatMuls run on int8 weights and uint8 activations (onnxruntime's fast U8S8 kernels on x86)
    assert weighted and all(any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                                for i in n.input) for n in weighted)
    zero_points = [inits[n.input[2]] for n in g.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.data_type == onnx.TensorProto.UINT8 for z in zero_points)
    weight_dq = [inits[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].dims and len(inits[n.input[0]].dims) >= 2]
    assert weight_dq and all(w.data_type == onnx.TensorProto.INT8 for w in weight_dq)

    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    xs = calib[0][0]
    with torch.no_grad():
        ref = model(xs).numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0]
    assert out.shape == ref.shape and np.abs(out - ref).max() <= 0.1 * np.abs(ref).max() + 0.05
