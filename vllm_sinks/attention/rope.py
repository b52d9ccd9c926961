"""Rotary positions for SINKS, computed by the backend instead of the model.

When SINKS is active the model's own rotary module is replaced by `DeferredRotary`, which passes q and k
through unrotated; the attention backend rotates them with `RotaryParams.rotate`:

* keys are rotated once, at their true stream index, before they are written to the paged cache;
* window queries are rotated at their true index, so a window key at distance d scores as distance d;
* sink queries are rotated at min(t, S + W), so sink key j scores as distance min(t, S + W) - j: the sinks sit
  right before the window, exactly as StreamingLLM's cache-index positions give.

Angles are `position * omega` in float64 reduced modulo 2*pi before cos/sin, so a token at index 10**7 is
rotated as precisely as a token at index 10. The per-frequency `omega` and magnitude `mscale` are read off the
model's own rotary table (float32, recomputed with the module's `_compute_cos_sin_cache`), so default, linear,
llama3 and YaRN scaling, NeoX/GPT-J style and partial rotary all follow the model exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TWO_PI = 2.0 * math.pi
_CHECKED_ROWS = 4096


class UnsupportedRotaryError(ValueError):
    """The model's rotary embedding cannot be re-encoded by SINKS."""


@dataclass(frozen=True)
class RotaryParams:
    """What SINKS needs of a model's rotary embedding.

    Invariant: for every position p inside the model's table, the table row equals
    [mscale * cos(p * omega), mscale * sin(p * omega)] to float32 rounding.
    """

    head_size: int
    rotary_dim: int
    is_neox_style: bool
    omega: torch.Tensor  # [rotary_dim // 2] float64, radians per position
    mscale: torch.Tensor  # [rotary_dim // 2] float64

    @classmethod
    def from_module(cls, rope: torch.nn.Module) -> RotaryParams:
        """Reads omega and mscale off `rope`'s float32 table and checks that they reproduce it."""
        name = type(rope).__name__
        for attr in ("head_size", "rotary_dim", "is_neox_style"):
            if not hasattr(rope, attr):
                raise UnsupportedRotaryError(f"rotary module {name} has no attribute {attr!r}")
        if not hasattr(rope, "_compute_cos_sin_cache"):
            raise UnsupportedRotaryError(f"rotary module {name} has no _compute_cos_sin_cache()")
        table = rope._compute_cos_sin_cache().detach().to("cpu", torch.float64)
        half = int(rope.rotary_dim) // 2
        if table.dim() != 2 or table.shape[1] != 2 * half or table.shape[0] < 2:
            raise UnsupportedRotaryError(
                f"rotary module {name} has a table of shape {tuple(table.shape)}; SINKS needs "
                f"[positions, rotary_dim={2 * half}] (multimodal or per-request rotary is not supported)"
            )
        cos, sin = table[:, :half], table[:, half:]
        mscale = torch.sqrt(cos[0] ** 2 + sin[0] ** 2)
        omega = torch.atan2(sin[1], cos[1])
        # Refine omega at positions 2, 4, 8, ...: unwrap the measured angle around the prediction.
        p = 2
        while p < table.shape[0]:
            measured = torch.atan2(sin[p], cos[p])
            predicted = p * omega
            turns = torch.round((predicted - measured) / TWO_PI)
            omega = (measured + turns * TWO_PI) / p
            p *= 2
        params = cls(
            head_size=int(rope.head_size),
            rotary_dim=2 * half,
            is_neox_style=bool(rope.is_neox_style),
            omega=omega,
            mscale=mscale,
        )
        # The table holds float32(p * omega): its own angle error grows like p * 2**-24, so compare where
        # that is far below the tolerance.
        rows = min(table.shape[0], _CHECKED_ROWS)
        rebuilt = params.cos_sin(torch.arange(rows, dtype=torch.int64), torch.float64)
        err = (torch.cat(rebuilt, dim=-1) - table[:rows]).abs().max().item()
        if not err < 1e-3:
            raise UnsupportedRotaryError(
                f"rotary module {name} is not a fixed per-frequency rotation (table error {err:.2e}); "
                "SINKS supports default, linear, llama3 and YaRN rotary embeddings"
            )
        return params

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ([n, rotary_dim // 2], scaled by mscale) at integer `positions` ([n])."""
        omega = self.omega.to(positions.device)
        angle = torch.remainder(positions.to(torch.float64)[:, None] * omega[None, :], TWO_PI)
        mscale = self.mscale.to(positions.device)
        return (torch.cos(angle) * mscale).to(dtype), (torch.sin(angle) * mscale).to(dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotates x ([n, heads, head_size]) at `positions` ([n]); returns a new tensor of x's dtype."""
        cos, sin = self.cos_sin(positions, torch.float32)
        return apply_rotary(x, cos, sin, self.rotary_dim, self.is_neox_style)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, is_neox_style: bool
) -> torch.Tensor:
    """x: [n, heads, head_size]; cos/sin: [n, rotary_dim // 2]. Arithmetic in float32."""
    xf = x.float()
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    c, s = cos[:, None, :], sin[:, None, :]
    if is_neox_style:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1).to(x.dtype)


def bind_rotary(model: torch.nn.Module, sinks_layers: dict[str, torch.nn.Module]) -> int:
    """Hands each SINKS attention layer (`sinks_layers`: name -> vLLM Attention with a SINKS impl) the
    rotary parameters of the `rotary_emb` module that sits next to it, and replaces that module with
    DeferredRotary (q and k pass through unrotated; the backend rotates them). Returns the number of layers
    bound; raises if a SINKS layer has no rotary embedding next to it."""
    if not sinks_layers:
        return 0
    layer_ids = {id(m) for m in sinks_layers.values()}
    params_of: dict[int, RotaryParams] = {}
    bound: set[str] = set()
    for parent_name, parent in model.named_modules():
        rope = getattr(parent, "rotary_emb", None)
        if rope is None:
            continue
        children = [
            (f"{parent_name}.{child_name}" if parent_name else child_name, child)
            for child_name, child in parent.named_children()
            if id(child) in layer_ids
        ]
        if not children:
            continue
        if isinstance(rope, DeferredRotary):
            params = rope.params
        else:
            if id(rope) not in params_of:
                params_of[id(rope)] = RotaryParams.from_module(rope)
            params = params_of[id(rope)]
            parent.rotary_emb = DeferredRotary(rope, params)
        for name, child in children:
            if params.head_size != child.head_size:
                raise ValueError(
                    f"SINKS: layer {name} has head_size {child.head_size} but its rotary embedding has "
                    f"head_size {params.head_size}"
                )
            child.impl.rope = params
            bound.add(name)
    missing = sorted(set(sinks_layers) - bound)
    if missing:
        raise ValueError(
            f"--attention-backend SINKS needs a RoPE model whose attention module holds `rotary_emb` next to "
            f"its attention layer; found none for {len(missing)} layer(s), e.g. {missing[0]} of "
            f"{type(model).__name__}. Models without rotary position embeddings are not supported."
        )
    return len(bound)


class DeferredRotary(torch.nn.Module):
    """Stands in for a model's rotary module under SINKS: returns q and k unrotated.

    The backend rotates them (see module docstring). It keeps the original module so its parameters stay
    readable and so no position ever indexes the model's rotary table.
    """

    def __init__(self, original: torch.nn.Module, params: RotaryParams) -> None:
        super().__init__()
        self.original = original
        self.params = params

    def forward(self, positions, query, key=None, *args, **kwargs):  # noqa: ARG002 - rotary signature
        return query, key
