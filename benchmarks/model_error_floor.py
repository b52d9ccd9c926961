"""What bf16 rounding alone costs each way of computing attention, at model level, on the CPU: an emulated
bf16 forward of a Llama/Qwen2 checkpoint (the rounding points of vLLM's GPU path) against the float64
references of tests/reference.py, per attention variant. It separates the function's sensitivity
(StreamingLLM's vs full attention's, under the same rounding) from what SINKS' GPU kernels add (FA3's partial
output rounded to bf16 before the LSE merge with the band and sink part), which the GPU's model-level error
cannot tell apart.

Rounding points (as vLLM's bf16 GPU path): weights in bf16; every GEMM accumulates in float32 from bf16
inputs and rounds its output (biases added before); RMSNorm and SiLU-and-mul in float32, outputs rounded; the
residual added in float32 and stored in bf16. Attention: scores and softmax in float32, probabilities rounded
to bf16 for P @ V (as FA3 and the band kernel do), accumulation in float32, output rounded. Rotary: dense as
vLLM's CUDA op (bf16 cos/sin table, each product and the difference rounded); SINKS as rope_and_cache
(float32, one rounding). Variants:
  dense            full causal attention (trained context >= prompt: compared at every position)
  sinks_split      SINKS as built on an H100/H200: FA3 over [t - W', t] (W' = ops_cuda.exact_fa_window), its
                   output rounded to bf16 with its LSE; the band [t - W, t - W' - 1] and the sinks in float32;
                   merged by LSE in float32 and rounded again
  sinks_single     the same keys in one softmax, rounded once (what an unsplit kernel would give)
  dense_fp32rope   dense with SINKS' rotary rounding, to separate the rotary's share
Every figure is |logprob(emulated) - logprob(float64 reference)| of each prompt token; several prompts
(seeds), since a max over 3,000 positions is one extreme of a noisy sample.
    python benchmarks/model_error_floor.py --seeds 11,12,13,14,15 --out floor.json    (random model, ~50 min)
    python benchmarks/model_error_floor.py --seeds 11 --save-errors --out floor11.json
    python benchmarks/model_error_floor.py --compare GPU.json floor11.json   (GPU.json: model_error.py
        --trained-context 4096 --save-errors, the same prompt)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "gpu"))
sys.path.insert(0, HERE)

BF16 = torch.bfloat16


def rnd(x: torch.Tensor) -> torch.Tensor:
    """Rounds float32 values to bf16 and back (round to nearest even, as the GPU's conversions)."""
    return x.to(BF16).float()


def keep(x: torch.Tensor) -> torch.Tensor:
    """No rounding (the float64 reference)."""
    return x


class EmulatedLlama:
    """Whole-sequence forward of a Llama/Qwen2 checkpoint. bf16 mode (exact=False): weights in bf16 and
    float32 arithmetic rounded at vLLM's points (module docstring). exact=True: float64 throughout, no
    rounding (the batched reference; tests/test_benchmarks_smoke.py checks it against tests/reference.py).
    `attention` is a callable (model, q, k, v, positions) -> [n, H * D] of unrotated q/k/v."""

    def __init__(self, model_dir: str, exact: bool = False) -> None:
        from reference import _inv_freq
        from safetensors.torch import load_file

        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
        self.dtype = torch.float64 if exact else torch.float32
        self.rnd = keep if exact else rnd
        weights = load_file(os.path.join(model_dir, "model.safetensors"))
        self.w = {}
        for k in list(weights):  # one tensor at a time: a 1.5B model's float64 copy is 12 GB
            self.w[k] = self.rnd(weights.pop(k).to(self.dtype))
        self.n_layers = c["num_hidden_layers"]
        self.n_heads = c["num_attention_heads"]
        self.n_kv = c.get("num_key_value_heads", self.n_heads)
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.n_heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.inv_freq = _inv_freq(c, self.head_dim)  # float64

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return self.rnd(y if bias is None else y + bias)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.rnd(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight)

    def token_logprobs(self, tokens: list[int], attention, rows: int = 256) -> torch.Tensor:
        """log p(tokens[i + 1] | tokens[: i + 1]) for every i, float64 (the LM head `rows` positions at a
        time: a 150k vocabulary's logits of 3,000 positions are 3.6 GB in float64)."""
        r = self.rnd
        ids = torch.tensor(tokens)
        n = len(tokens)
        pos = torch.arange(n)
        h = self.w["model.embed_tokens.weight"][ids]
        residual = None
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            residual = h if residual is None else r(h + residual)
            x = self._norm(residual, self.w[p + "input_layernorm.weight"])
            q = self._linear(p + "self_attn.q_proj", x).view(n, self.n_heads, self.head_dim)
            k = self._linear(p + "self_attn.k_proj", x).view(n, self.n_kv, self.head_dim)
            v = self._linear(p + "self_attn.v_proj", x).view(n, self.n_kv, self.head_dim)
            h = self._linear(p + "self_attn.o_proj", attention(self, q, k, v, pos))
            residual = r(h + residual)
            x = self._norm(residual, self.w[p + "post_attention_layernorm.weight"])
            gate = self._linear(p + "mlp.gate_proj", x)
            up = self._linear(p + "mlp.up_proj", x)
            h = self._linear(p + "mlp.down_proj", r(torch.nn.functional.silu(gate) * up))
        x = self._norm(r(h + residual), self.w["model.norm.weight"])
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        out = torch.empty(n - 1, dtype=torch.float64)
        for a in range(0, n - 1, rows):
            b = min(a + rows, n - 1)
            lp = torch.log_softmax(r(x[a:b] @ head.T), dim=-1)
            out[a:b] = lp[torch.arange(b - a), ids[a + 1 : b + 1]].double()
        return out

    # -- rotary ---------------------------------------------------------------------------------------------
    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ang = positions.double()[:, None] * self.inv_freq[None, :]
        return ang.cos()[:, None, :].to(self.dtype), ang.sin()[:, None, :].to(self.dtype)

    def rope_vllm(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """vLLM's CUDA rotary op on bf16: a bf16 cos/sin table, each product and the difference rounded."""
        r = self.rnd
        cos, sin = (r(t) for t in self._angles(positions))
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((r(r(x1 * cos) - r(x2 * sin)), r(r(x2 * cos) + r(x1 * sin))), dim=-1)

    def rope_fp32(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """SINKS' rope_and_cache: float32 rotation from float64 angles, one rounding."""
        cos, sin = self._angles(positions)
        x1, x2 = x.chunk(2, dim=-1)
        return self.rnd(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def _per_kv_head(model: EmulatedLlama, q, k, v, attend_group) -> torch.Tensor:
    """Runs attend_group(q [G, n, D], k [n, D], v [n, D]) -> [G, n, D] per KV head (bounded memory) and
    returns [n, H * D] rounded."""
    group = model.n_heads // model.n_kv
    outs = [
        attend_group(q[:, j * group : (j + 1) * group].transpose(0, 1), k[:, j], v[:, j])
        for j in range(model.n_kv)
    ]
    return model.rnd(torch.cat(outs, dim=0)).transpose(0, 1).reshape(q.shape[0], -1)


def _softmax_pv(model: EmulatedLlama, s: torch.Tensor, v: torch.Tensor):
    """Scores s [G, n, m] (-inf where masked) over values v [m, D], probabilities rounded as P @ V's input:
    (output [G, n, D] unrounded, lse [G, n]; -inf where a row has no key)."""
    m = s.amax(-1, keepdim=True)
    m_safe = torch.where(torch.isinf(m), 0.0, m)
    p = torch.exp(s - m_safe)
    l_sum = p.sum(-1, keepdim=True)
    o = (model.rnd(p) @ v) / torch.where(l_sum > 0, l_sum, 1.0)
    lse = torch.where(l_sum > 0, m_safe + torch.log(torch.clamp(l_sum, min=1e-30)), float("-inf"))
    return o, lse.squeeze(-1)


def dense(rope: str):
    """Full causal attention; rope "vllm" (vLLM's rotary op) or "fp32" (rope_and_cache's)."""

    def attend(model: EmulatedLlama, q, k, v, pos):
        rot = model.rope_vllm if rope == "vllm" else model.rope_fp32
        scale = 1 / math.sqrt(model.head_dim)
        causal = pos[None, :] <= pos[:, None]

        def group(qg, kg, vg):
            s = torch.where(causal, (qg @ kg.T) * scale, float("-inf"))
            return _softmax_pv(model, s, vg)[0]

        return _per_kv_head(model, rot(q, pos), rot(k, pos), v, group)

    return attend


def sinks(S: int, W: int, split: bool):
    """SINKS' function: keys [0, min(S, t - W)) scored with the query rotated at min(t, S + W), keys
    [t - W, t] with the query at t (keys rotated at their own positions, as rope_and_cache caches them).
    split: FA3's part [t - W', t] rounded to the model's dtype and merged by LSE with the band and sinks."""

    def attend(model: EmulatedLlama, q, k, v, pos):
        from vllm_sinks.attention.ops_cuda import exact_fa_window

        scale = 1 / math.sqrt(model.head_dim)
        t, key = pos[:, None], pos[None, :]
        sink_cols = key < torch.clamp(t - W, min=0).clamp(max=S)
        wl = exact_fa_window(W, model.head_dim, model.n_heads // model.n_kv) if split else -1
        fa_keys = (key >= t - wl) & (key <= t)
        rest = (key >= t - W) & (key <= t - wl - 1)  # the band (the whole window when not split)
        q_win, q_sink = model.rope_fp32(q, pos), model.rope_fp32(q, torch.clamp(pos, max=S + W))
        q_both = torch.stack((q_win, q_sink))  # [2, n, H, D]

        def group(qg, kg, vg):  # qg [G, n, 2, D]: window- and sink-rotated queries
            s_win = (qg[:, :, 0] @ kg.T) * scale
            s_rest = torch.where(rest, s_win, float("-inf"))
            s_sink = torch.where(sink_cols, (qg[:, :, 1] @ kg.T) * scale, float("-inf"))
            s_rest = torch.maximum(s_rest, s_sink)
            o_b, lse_b = _softmax_pv(model, s_rest, vg)  # disjoint key sets: one score per key
            if wl < 0:
                return o_b
            o_fa, lse_fa = _softmax_pv(model, torch.where(fa_keys, s_win, float("-inf")), vg)
            o_fa = model.rnd(o_fa)  # FA3 writes its output in the model's dtype
            m = torch.maximum(lse_fa, lse_b)
            a, b = torch.exp(lse_fa - m)[..., None], torch.exp(lse_b - m)[..., None]
            return (a * o_fa + b * o_b) / (a + b)

        return _per_kv_head(model, q_both.permute(1, 2, 0, 3), model.rope_fp32(k, pos), v, group)

    return attend


def stats(err: torch.Tensor) -> dict:
    return {"mean": round(err.mean().item(), 5), "p99": round(torch.quantile(err, 0.99).item(), 5),
            "max": round(err.max().item(), 5), "argmax": int(err.argmax()) + 1}  # fmt: skip


def references(path: str, prompt: list[int], windows: list[int], batched: bool) -> dict:
    """The float64 logprobs per window (None: full attention): tests/reference.py token by token, or the
    batched exact forward (for models too large to run token by token here)."""
    import gc

    from reference import StreamingLlama

    if not batched:
        return {
            W: torch.tensor(StreamingLlama(path, 4, W).token_logprobs(prompt), dtype=torch.float64)
            for W in [None, *windows]
        }
    exact = EmulatedLlama(path, exact=True)
    with torch.inference_mode():
        out = {None: exact.token_logprobs(prompt, dense("fp32"))}
        out.update({W: exact.token_logprobs(prompt, sinks(4, W, split=False)) for W in windows})
    del exact
    gc.collect()
    return out


def compare(gpu_json: str, floor_json: str) -> dict:
    """Pearson and Spearman correlations, position by position, of a GPU run's errors (model_error.py
    --save-errors, one prompt) with this script's (--save-errors, the same prompt): how closely the emulation
    follows the GPU's kernels, next to how closely two emulated variants follow each other."""
    import numpy as np

    def ranks(x: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(x)).astype(float)

    gpu = json.load(open(gpu_json))["errors"]
    emu = json.load(open(floor_json))["errors"]
    out = {}
    pairs = [("dense_all", "dense"), ("dense_all", "dense_fp32rope")]
    for name in gpu:
        if name.startswith("sinks_4+"):
            W = name.split("+")[1]
            pairs += [(name, f"sinks_split_4+{W}"), (name, f"sinks_single_4+{W}")]
    for g, e in pairs:
        if g in gpu and e in emu:
            x, y = np.array(gpu[g]), np.array(emu[e])
            out[f"gpu {g} ~ emulated {e}"] = {
                "pearson": round(float(np.corrcoef(x, y)[0, 1]), 3),
                "spearman": round(float(np.corrcoef(ranks(x), ranks(y))[0, 1]), 3),
            }
    for a, b in [("dense", "dense_fp32rope"), ("sinks_split_4+1020", "sinks_single_4+1020")]:
        if a in emu and b in emu:
            x, y = np.array(emu[a]), np.array(emu[b])
            out[f"emulated {a} ~ emulated {b}"] = {"pearson": round(float(np.corrcoef(x, y)[0, 1]), 3)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--windows", default="1020,1023", help="SINKS windows W (S=4)")
    p.add_argument("--seeds", default=None, help="prompt seeds (default 11, or 0 with --model)")
    p.add_argument("--root", default="/tmp/vllm_sinks_models")
    p.add_argument("--model", default=None, help="a float32 checkpoint dir instead of the random model")
    p.add_argument("--trained-context", type=int, default=4096,
                   help="the random model's (4096: dense compared at every position)")  # fmt: skip
    p.add_argument("--reference", choices=["token", "batched"], default=None,
                   help="token: tests/reference.py (default for the random model); batched: this script's "
                   "exact float64 forward (default with --model; tests/test_benchmarks_smoke.py checks it "
                   "against the token-by-token reference)")  # fmt: skip
    p.add_argument("--save-errors", action="store_true",
                   help="also write each position's absolute error (first seed only)")  # fmt: skip
    p.add_argument("--compare", nargs=2, metavar=("GPU_JSON", "FLOOR_JSON"), default=None,
                   help="only print the position-by-position correlations of a GPU run's errors with this "
                   "script's (both with --save-errors, one prompt)")  # fmt: skip
    p.add_argument("--check-reference", type=int, default=None, metavar="N",
                   help="only compare the batched float64 forward with tests/reference.py on the first N "
                   "tokens of the first prompt (full attention and S=4, W=60), e.g. for --model")  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.compare:
        out = compare(*a.compare)
        print(json.dumps(out, indent=1))
        return out
    if a.threads:
        torch.set_num_threads(a.threads)
    from model_error import build_model, make_prompts
    from run_record import emit, provenance

    path = a.model or build_model(a.root, a.trained_context)
    seeds = [int(x) for x in (a.seeds or ("0" if a.model else "11")).split(",")]
    batched = (a.reference or ("batched" if a.model else "token")) == "batched"
    windows = [int(x) for x in a.windows.split(",")]
    variants = {"dense": (None, dense("vllm")), "dense_fp32rope": (None, dense("fp32"))}
    for W in windows:
        variants[f"sinks_split_4+{W}"] = (W, sinks(4, W, split=True))
        variants[f"sinks_single_4+{W}"] = (W, sinks(4, W, split=False))
    result: dict = {
        "benchmark": "model-level logprob error of emulated bf16 attention variants vs float64 references",
        "model": a.model or f"seeded random Llama (build_model, trained context {a.trained_context})",
        "tokens": a.tokens,
        "reference": "batched float64 forward" if batched else "tests/reference.py, token by token",
        "seeds": {},
        **provenance(__file__, argv),
    }
    if a.check_reference:
        prompt = make_prompts(path, bool(a.model), seeds[:1], a.tokens)[0][: a.check_reference]
        batched_refs = references(path, prompt, [60], batched=True)
        token_refs = references(path, prompt, [60], batched=False)
        diff = {str(W): float((batched_refs[W] - token_refs[W]).abs().max()) for W in batched_refs}
        result["check_reference"] = {"tokens": len(prompt), "max_abs_diff": diff}
        print(json.dumps(result["check_reference"]), flush=True)
        return emit(result, a.out)
    model = None
    for seed, prompt in zip(seeds, make_prompts(path, bool(a.model), seeds, a.tokens), strict=True):
        refs = references(path, prompt, windows, batched)
        model = model or EmulatedLlama(path)
        per: dict = {}
        with torch.inference_mode():
            for name, (W, attend) in variants.items():
                err = (model.token_logprobs(prompt, attend) - refs[W]).abs()
                per[name] = stats(err)
                if a.save_errors and not result["seeds"]:
                    result.setdefault("errors", {"seed": seed})[name] = [round(x, 5) for x in err.tolist()]
        for name in per:
            if name != "dense":
                per[name]["max_ratio_to_dense"] = round(per[name]["max"] / per["dense"]["max"], 3)
                per[name]["p99_ratio_to_dense"] = round(per[name]["p99"] / per["dense"]["p99"], 3)
        result["seeds"][str(seed)] = per
        print(json.dumps({seed: per}), flush=True)
    return emit(result, a.out)


if __name__ == "__main__":
    main()
