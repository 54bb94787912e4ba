"""Rebuild a transformers `Dinov2Model` from a DINOv2 backbone exported to ONNX by `torch.onnx.export`.

Why this works: the exporter keeps the PyTorch module names. Most weights are stored as initializers with their
original state-dict names (`backbone.encoder.layer.0.norm1.weight`, ...). Linear layers are the exception: the
exporter turns them into `MatMul(x, W^T)` nodes whose weight is an anonymous initializer (`onnx::MatMul_1966`),
but the *node* is named after the module (`/backbone/encoder/layer.0/attention/attention/key/MatMul`), so the
weight name is recovered from the node name. The position embedding is split by the exporter into two anonymous
initializers: the class-token row [1, 1, D] and the patch grid [1, N, D]; we concatenate them back.

Only the `onnx` package is needed; the names are those of the classic Hugging Face DINOv2 checkpoints, and
`from_pretrained` maps them onto whatever layout the installed transformers version uses.
"""

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

# Prefix of the DINOv2 module inside the exported model (the rest of the graph is a task head we do not need).
BACKBONE_PREFIX = "backbone."
# The ONNX tensor that equals Dinov2Model(...).last_hidden_state: the output of the final layer norm.
LAST_HIDDEN_STATE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of `Constant` nodes, keyed by their output name (head counts and epsilons live there)."""
    values = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _linear_weights(graph: onnx.GraphProto, initializers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`<module>.weight` for every exported Linear: MatMul nodes named `/<module path>/MatMul` with a constant W^T."""
    weights = {}
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.endswith("/MatMul") or node.input[1] not in initializers:
            continue
        module_path = node.name[1:-len("/MatMul")].replace("/", ".")
        # ONNX computes x @ W^T; torch.nn.Linear stores W as [out_features, in_features].
        weights[f"{module_path}.weight"] = initializers[node.input[1]].T
    return weights


def _position_embeddings(initializers: dict[str, np.ndarray], hidden_size: int) -> np.ndarray:
    """Re-join the class-token and patch-grid position embeddings that the exporter stored separately."""
    anonymous = [value for name, value in initializers.items()
                 if not name.startswith(BACKBONE_PREFIX) and value.ndim == 3 and value.shape[0] == 1
                 and value.shape[2] == hidden_size]
    class_rows = [value for value in anonymous if value.shape[1] == 1]
    grids = [value for value in anonymous if value.shape[1] > 1 and math.isqrt(value.shape[1]) ** 2 == value.shape[1]]
    if len(class_rows) != 1 or len(grids) != 1:
        raise ValueError(
            f"Expected one [1, 1, {hidden_size}] and one [1, N*N, {hidden_size}] position-embedding initializer in "
            f"the ONNX graph, found shapes {[list(value.shape) for value in anonymous]}. "
            "This converter only understands DINOv2 models exported by torch.onnx.export from transformers."
        )
    return np.concatenate([class_rows[0], grids[0]], axis=1)


def _attention_heads(graph: onnx.GraphProto, constants: dict[str, np.ndarray], hidden_size: int) -> int:
    """Read the head count from the first layer's query reshape target [batch, tokens, heads, head_dim]."""
    query_output = f"/{BACKBONE_PREFIX[:-1]}/encoder/layer.0/attention/attention/query/Add_output_0"
    reshape_targets = {node.output[0]: node for node in graph.node if node.op_type == "Concat"}
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[0] == query_output and node.input[1] in reshape_targets:
            dims = [constants[name].item() for name in reshape_targets[node.input[1]].input if name in constants]
            heads, head_dim = dims[-2], dims[-1]
            if heads * head_dim == hidden_size:
                return int(heads)
    raise ValueError("Could not find the attention head count (query reshape) of layer 0 in the ONNX graph.")


def _layer_norm_eps(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> float:
    """The epsilon added to the variance in the exported layer norms (DINOv2 uses 1e-6)."""
    for node in graph.node:
        if node.name == f"/{BACKBONE_PREFIX[:-1]}/layernorm/Add":
            for name in node.input:
                if name in constants:
                    # str() of a float32 gives its shortest decimal form: 1e-06 rather than 9.99999997e-07.
                    return float(str(np.float32(constants[name])))
    raise ValueError("Could not find the final layer norm epsilon in the ONNX graph.")


def dinov2_from_onnx(onnx_path: Path) -> Dinov2Model:
    """Load the DINOv2 backbone of an exported ONNX model as a `Dinov2Model` with the exact weights, in eval mode."""
    model_proto = onnx.load(str(onnx_path))
    graph = model_proto.graph
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    constants = _constants(graph)

    state = {name[len(BACKBONE_PREFIX):]: value for name, value in initializers.items()
             if name.startswith(BACKBONE_PREFIX)}
    state.update({name[len(BACKBONE_PREFIX):]: value
                  for name, value in _linear_weights(graph, initializers).items() if name.startswith(BACKBONE_PREFIX)})
    if "embeddings.cls_token" not in state:
        raise ValueError(f"{onnx_path}: no '{BACKBONE_PREFIX}embeddings.cls_token' initializer; "
                         "this does not look like an exported DINOv2 backbone.")

    hidden_size = state["embeddings.cls_token"].shape[-1]
    patch_size = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    positions = _position_embeddings(initializers, hidden_size)
    state["embeddings.position_embeddings"] = positions
    # The mask token is only used for masked-image pretraining, so the exporter dropped it; zeros are harmless.
    state["embeddings.mask_token"] = np.zeros((1, hidden_size), dtype=np.float32)

    num_layers = len({name.split(".")[2] for name in state if name.startswith("encoder.layer.")})
    grid = math.isqrt(positions.shape[1] - 1)
    config = Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=_attention_heads(graph, constants, hidden_size),
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden_size,
        patch_size=patch_size,
        image_size=grid * patch_size,  # the resolution the position embeddings were trained at (518 for DINOv2)
        layer_norm_eps=_layer_norm_eps(graph, constants),
        layerscale_value=1.0,
        hidden_act="gelu",  # the graph computes the exact erf GELU
    )
    tensors = {name: torch.tensor(value) for name, value in state.items()}  # copies: ONNX arrays are read-only
    model, loading_info = Dinov2Model.from_pretrained(None, config=config, state_dict=tensors,
                                                      output_loading_info=True)
    problems = {kind: sorted(keys) for kind, keys in loading_info.items() if keys}
    if problems:
        raise ValueError(f"{onnx_path}: the ONNX weights do not match Dinov2Model ({config.num_hidden_layers} layers, "
                         f"hidden {hidden_size}): {problems}")
    return model.eval()
