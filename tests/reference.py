"""Independent StreamingLLM reference: plain PyTorch, shares no code with vllm_sinks.

Runs a Hugging Face Llama-family (Llama, Mistral, Qwen2 with its q/k/v biases; NeoX-style rotary) or GPT-J
(GPT-J-style, interleaved rotary) checkpoint (config.json + safetensors) token by token with the cache
policy of StreamingLLM / `attention_sinks`:
  * the cache holds keys *before* rotation and values;
  * each step appends the new token, rotates every cached key at its *cache index* and the query at the
    last index, attends over the whole cache (so the new token sees the cache and itself);
  * after the step, if the cache is longer than S + W it keeps the first S entries and the last W.
Arithmetic in float64, on the CPU or (`device`, for models too large to run token by token there) a GPU.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file


def _inv_freq(config: dict, rotary_dim: int) -> torch.Tensor:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        inv = inv / rope["factor"]
    elif kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"reference: rope type {kind} not implemented")
    return inv


class StreamingLlama:
    """Token-by-token StreamingLLM over a Llama or GPT-J checkpoint. `window_tokens=None`: full cache."""

    def __init__(
        self, model_dir: str, sink_tokens: int, window_tokens: int | None, device: str | torch.device = "cpu"
    ):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.config = c = json.load(f)
        self.device = torch.device(device)
        weights = load_file(os.path.join(model_dir, "model.safetensors"))
        self.w = {k: v.to(self.device, torch.float64) for k, v in weights.items()}
        del weights
        self.gptj = c.get("model_type") == "gptj"
        if self.gptj:
            self.n_layers, self.n_heads = c["n_layer"], c["n_head"]
            self.n_kv = self.n_heads
            self.head_dim = c["n_embd"] // self.n_heads
            self.rotary_dim = c["rotary_dim"] or self.head_dim
            exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim
            self.inv_freq = (1.0 / (10000.0**exponent)).to(self.device)
            self.eps = c.get("layer_norm_epsilon", 1e-5)
        else:
            self.n_layers = c["num_hidden_layers"]
            self.n_heads = c["num_attention_heads"]
            self.n_kv = c.get("num_key_value_heads", self.n_heads)
            self.head_dim = c.get("head_dim") or c["hidden_size"] // self.n_heads
            rope = c.get("rope_parameters") or {}
            partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
            self.rotary_dim = int(self.head_dim * partial)
            self.inv_freq = _inv_freq(c, self.rotary_dim).to(self.device)
            self.eps = c.get("rms_norm_eps", 1e-6)
        self.S = sink_tokens
        self.W = window_tokens
        self.reset()

    def reset(self) -> None:
        empty = dict(dtype=torch.float64, device=self.device)
        self.k_cache = [torch.zeros(0, self.n_kv, self.head_dim, **empty) for _ in range(self.n_layers)]
        self.v_cache = [torch.zeros(0, self.n_kv, self.head_dim, **empty) for _ in range(self.n_layers)]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotation of the first rotary_dim dims of x ([n, heads, d]) at positions ([n]): NeoX style
        (halves) for Llama, GPT-J style (interleaved pairs) for GPT-J."""
        ang = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.gptj:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
            return torch.cat((out, rest), dim=-1)
        x1, x2 = rot.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Appends (k, v) to layer i's cache, attends over it at cache-index positions, trims the cache."""
        keys = torch.cat((self.k_cache[i], k[None]), dim=0)
        values = torch.cat((self.v_cache[i], v[None]), dim=0)
        m = keys.shape[0]
        idx = torch.arange(m, device=self.device)
        k_rot = self._rotate(keys, idx)
        q_rot = self._rotate(q[None], idx[-1:])[0]
        group = self.n_heads // self.n_kv
        k_rot = k_rot.repeat_interleave(group, dim=1)
        vals = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,mhd->hm", q_rot, k_rot) / math.sqrt(self.head_dim)
        attn = torch.einsum("hm,mhd->hd", torch.softmax(scores, dim=-1), vals).reshape(-1)
        if self.W is not None and m > self.S + self.W:
            keys = torch.cat((keys[: self.S], keys[m - self.W :]), dim=0)
            values = torch.cat((values[: self.S], values[m - self.W :]), dim=0)
        self.k_cache[i], self.v_cache[i] = keys, values
        return attn

    def _step_gptj(self, token: int) -> torch.Tensor:
        w = self.w
        h = w["transformer.wte.weight"][token]
        for i in range(self.n_layers):
            p = f"transformer.h.{i}."
            x = torch.nn.functional.layer_norm(h, h.shape, w[p + "ln_1.weight"], w[p + "ln_1.bias"], self.eps)
            q = (w[p + "attn.q_proj.weight"] @ x).view(self.n_heads, self.head_dim)
            k = (w[p + "attn.k_proj.weight"] @ x).view(self.n_kv, self.head_dim)
            v = (w[p + "attn.v_proj.weight"] @ x).view(self.n_kv, self.head_dim)
            attn = w[p + "attn.out_proj.weight"] @ self._attend(i, q, k, v)
            mlp = w[p + "mlp.fc_in.weight"] @ x + w[p + "mlp.fc_in.bias"]
            mlp = (
                w[p + "mlp.fc_out.weight"] @ torch.nn.functional.gelu(mlp, approximate="tanh")
                + w[p + "mlp.fc_out.bias"]
            )
            h = h + attn + mlp
        h = torch.nn.functional.layer_norm(
            h, h.shape, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], self.eps
        )
        return w["lm_head.weight"] @ h + w["lm_head.bias"]

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """weight @ x (+ bias where the checkpoint has one: Qwen2's q/k/v projections)."""
        y = self.w[name + ".weight"] @ x
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def step(self, token: int) -> torch.Tensor:
        """Feeds one token; returns its next-token logits (float64, [vocab])."""
        if self.gptj:
            return self._step_gptj(token)
        w = self.w
        h = w["model.embed_tokens.weight"][token]
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            x = self._norm(h, w[p + "input_layernorm.weight"])
            q = self._linear(p + "self_attn.q_proj", x).view(self.n_heads, self.head_dim)
            k = self._linear(p + "self_attn.k_proj", x).view(self.n_kv, self.head_dim)
            v = self._linear(p + "self_attn.v_proj", x).view(self.n_kv, self.head_dim)
            attn = self._attend(i, q, k, v)
            h = h + w[p + "self_attn.o_proj.weight"] @ attn
            x = self._norm(h, w[p + "post_attention_layernorm.weight"])
            gate = w[p + "mlp.gate_proj.weight"] @ x
            up = w[p + "mlp.up_proj.weight"] @ x
            h = h + w[p + "mlp.down_proj.weight"] @ (torch.nn.functional.silu(gate) * up)
        h = self._norm(h, w["model.norm.weight"])
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return head @ h

    def logprobs(self, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), vocab] log-probabilities of the next token after each prefix, from a fresh cache."""
        self.reset()
        return torch.stack([torch.log_softmax(self.step(t), dim=-1) for t in tokens])

    def token_logprobs(self, tokens: list[int]) -> list[float]:
        """log p(tokens[i + 1] | tokens[: i + 1]) for every i, from a fresh cache (no [n, vocab] matrix)."""
        self.reset()
        with torch.inference_mode():
            pairs = zip(tokens, tokens[1:], strict=False)
            return [float(torch.log_softmax(self.step(t), dim=-1)[nxt]) for t, nxt in pairs]

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation of `prompt` from a fresh cache."""
        self.reset()
        for t in prompt[:-1]:
            self.step(t)
        out, last = [], prompt[-1]
        for _ in range(max_tokens):
            last = int(torch.argmax(self.step(last)))
            out.append(last)
        return out

    def greedy_mismatch(self, prompt: list[int], got: list[int]) -> int | None:
        """Checks `got`, token by token, as a greedy continuation of `prompt`: teacher-forced on `got`, each
        token must be this reference's argmax there, or within 1e-4 of it (a genuine tie, which float32 and
        float64 may break differently; every later token is still checked, on the stream `got` took).
        Returns None if every token is the argmax, else the index of the first tie taken the other way."""
        self.reset()
        for t in prompt[:-1]:
            self.step(t)
        first_tie, last = None, prompt[-1]
        for i, tok in enumerate(got):
            logits = self.step(last)
            best = int(torch.argmax(logits))
            if tok != best:
                gap = (logits[best] - logits[tok]).item()
                assert gap < 1e-4, f"token {i} of {len(got)}: {tok}, argmax {best}, gap {gap:.3g}: no tie"
                first_tie = i if first_tie is None else first_tie
            last = tok
        return first_tie

    def check_session(self, turns: list[tuple[list[int], list[int]]], limit: int | None = None) -> int:
        """A live session's turns (message, reply) against one stream over message 1 + reply 1 + message 2
        + ... (each reply without its last sampled token, which vLLM never feeds back): at each reply token
        this reference's argmax must be that token, or a genuine tie (top-2 logits within 1e-4). Stops after
        the turn in which `limit` stream tokens are reached; returns the reply tokens checked."""
        self.reset()
        logits, seen, checked = None, 0, 0
        for message, reply in turns:
            for tok in message:
                logits = self.step(tok)
                seen += 1
            for i, tok in enumerate(reply):
                top2 = torch.topk(logits, 2)
                if int(top2.indices[0]) != tok:
                    assert (top2.values[0] - top2.values[1]).item() < 1e-4, f"reply token differs at {seen}"
                checked += 1
                if i == len(reply) - 1:
                    break  # the last sampled token is not part of the stream
                logits = self.step(tok)
                seen += 1
            if limit is not None and seen >= limit:
                break
        return checked
