"""Block and matrix discovery across architectures."""

from __future__ import annotations

import pytest
from torch import nn

from layerif.errors import LayerIFError
from layerif.models import find_blocks, select_matrices
from tests.conftest import tiny_llama
from tests.helpers import tiny_gpt2, tiny_neox


def test_llama_matrices_split_attn_mlp():
    model = tiny_llama(layers=3)
    per_layer = select_matrices(model, "all")
    assert len(per_layer) == 3
    names = [ref.name for ref in per_layer[0]]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert [ref.name for ref in select_matrices(model, "attn")[1]] == names[:4]
    assert [ref.name for ref in select_matrices(model, "mlp")[2]] == names[4:]
    k_proj = per_layer[0][1]
    assert (k_proj.d_out, k_proj.d_in) == tuple(k_proj.module.weight.shape)


def test_gpt2_conv1d_is_transposed():
    per_layer = select_matrices(tiny_gpt2(layers=2), "all")
    names = [ref.name for ref in per_layer[0]]
    assert names == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    c_attn = per_layer[0][0]
    assert c_attn.transposed and (c_attn.d_in, c_attn.d_out) == tuple(c_attn.module.weight.shape)
    assert c_attn.d_out == 3 * c_attn.d_in


def test_neox_blocks_found():
    path, blocks = find_blocks(tiny_neox(layers=2))
    assert path == "gpt_neox.layers" and len(blocks) == 2
    kinds = {ref.kind for ref in select_matrices(tiny_neox(layers=2), "all")[0]}
    assert kinds == {"attn", "mlp"}


def test_unknown_architecture_is_a_clear_error():
    class NotATransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(LayerIFError, match="cannot find the decoder blocks.*model.layers"):
        find_blocks(NotATransformer())


def test_bad_module_selection():
    with pytest.raises(LayerIFError, match="--modules"):
        select_matrices(tiny_llama(layers=1), "ffn")
