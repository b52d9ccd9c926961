"""Rotary re-encoding: RotaryParams reproduces vLLM's own rotary tables, and relative rotations stay exact
at stream indices in the millions (angles in float64)."""

from __future__ import annotations

import pytest
import torch


def _vllm_rope(head_size, rotary_dim, neox, params):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    if rotary_dim != head_size:
        params = dict(params, partial_rotary_factor=rotary_dim / head_size)
    with set_current_vllm_config(VllmConfig()):
        return get_rope(
            head_size, max_position=4096, is_neox_style=neox, rope_parameters=params, dtype=torch.float32
        )


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
}


@pytest.mark.parametrize("kind", list(ROPES))
@pytest.mark.parametrize(
    "head_size,rotary_dim,neox",
    [(64, 64, True), (128, 128, True), (64, 32, True), (64, 64, False), (128, 64, False)],
)
def test_params_reproduce_vllm_rotary(kind, head_size, rotary_dim, neox):
    from vllm_sinks.attention.rope import RotaryParams

    rope = _vllm_rope(head_size, rotary_dim, neox, ROPES[kind])
    params = RotaryParams.from_module(rope)
    assert params.rotary_dim == rotary_dim and params.is_neox_style == neox
    g = torch.Generator().manual_seed(0)
    q = torch.randn(50, 4, head_size, generator=g)
    k = torch.randn(50, 2, head_size, generator=g)
    pos = torch.randint(0, 4096, (50,), generator=g)
    q_ref, k_ref = rope.forward_native(pos, q.clone().view(50, -1), k.clone().view(50, -1))
    # vLLM's table holds float32(p * inv_freq): its own angle error grows to ~p * 2**-24 (2.4e-4 rad at
    # p = 4096). RotaryParams computes the angle in float64, so the two agree to that rounding.
    torch.testing.assert_close(params.rotate(q, pos), q_ref.view_as(q), atol=2e-3, rtol=0)
    torch.testing.assert_close(params.rotate(k, pos), k_ref.view_as(k), atol=2e-3, rtol=0)
    small = pos < 256  # where float32 products are still exact to ~1e-5
    torch.testing.assert_close(params.rotate(q, pos)[small], q_ref.view_as(q)[small], atol=5e-5, rtol=0)


@pytest.mark.parametrize("offset", [10**6, 10**7, 2**31 + 12345])
def test_relative_scores_do_not_decay_with_stream_length(offset):
    """q.k after rotating at (t + offset, j + offset) equals q.k at (t, j): what a stream at index
    `offset` computes equals what StreamingLLM computes with cache indices."""
    from vllm_sinks.attention.rope import RotaryParams

    params = RotaryParams.from_module(_vllm_rope(128, 128, True, ROPES["llama3"]))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(64, 8, 128, generator=g, dtype=torch.float64).float()
    k = torch.randn(64, 8, 128, generator=g, dtype=torch.float64).float()
    t = torch.randint(0, 2000, (64,), generator=g)
    j = torch.randint(0, 2000, (64,), generator=g)
    near = (params.rotate(q, t) * params.rotate(k, j)).sum(-1)
    far = (params.rotate(q, t + offset) * params.rotate(k, j + offset)).sum(-1)
    assert (near - far).abs().max() < 1e-4 * near.abs().max()


def test_non_rotary_table_is_refused():
    from vllm_sinks.attention.rope import RotaryParams, UnsupportedRotaryError

    class NotARope(torch.nn.Module):
        head_size, rotary_dim, is_neox_style = 64, 64, True

        def _compute_cos_sin_cache(self):
            return torch.rand(128, 64)

    with pytest.raises(UnsupportedRotaryError, match="not a fixed per-frequency rotation"):
        RotaryParams.from_module(NotARope())
