"""Plugin discovery, the name SINKS through the CLI parser and EngineArgs, and start-up refusals."""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points

import pytest


def test_entry_point_is_registered():
    eps = entry_points(group="vllm.general_plugins")
    assert "vllm_sinks.plugin:register" in {ep.value for ep in eps}


def test_vllm_loads_plugin_and_knows_sinks():
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    load_general_plugins()
    backend = AttentionBackendEnum["SINKS"]
    from vllm_sinks.attention.backend import SinksAttentionBackend

    assert backend.get_class() is SinksAttentionBackend
    assert AttentionBackendEnum["sinks".upper()] is backend
    # Other backends are untouched.
    assert AttentionBackendEnum["FLASH_ATTN"].get_class().get_name() == "FLASH_ATTN"


def test_other_vllm_version_is_refused(monkeypatch):
    import vllm

    from vllm_sinks import patch

    monkeypatch.setattr(vllm, "__version__", "0.25.1")
    with pytest.raises(ImportError, match="supports vLLM 0.26.0 only"):
        patch.check_vllm_version()


def _engine_config(argv):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(argv)
    return EngineArgs.from_cli_args(args).create_engine_config()


def test_cli_parser_accepts_sinks_literally(model_dir):
    from vllm_sinks.config import BACKEND_PATH

    path = model_dir()
    cfg = _engine_config(
        [
            "--model",
            path,
            "--attention-backend",
            "SINKS",
            "--block-size",
            "16",
            "--additional-config",
            json.dumps({"sinks": {"sink_tokens": 2, "window_tokens": 50}}),
        ]
    )
    assert cfg.attention_config.backend.get_path() == BACKEND_PATH
    assert cfg.additional_config["sinks"] == {"sink_tokens": 2, "window_tokens": 50}
    # Streams may run past the model's trained context (2048): the default limit is lifted.
    assert cfg.model_config.max_model_len > 2048


def test_max_model_len_beyond_trained_context_is_accepted(model_dir):
    cfg = _engine_config(
        ["--model", model_dir(), "--attention-backend", "SINKS", "--max-model-len", "1000000"]
    )
    assert cfg.model_config.max_model_len == 1_000_000


def test_engine_defaults_follow_max_model_len_as_for_stock(model_dir):
    """vLLM caps the default max_num_batched_tokens at max_num_seqs x max_model_len; SINKS gets the same cap
    from the same --max-model-len (below the trained context here)."""
    base = ["--model", model_dir(), "--max-model-len", "656", "--max-num-seqs", "2", "--block-size", "16"]
    sinks = ["--attention-backend", "SINKS", "--additional-config", '{"sinks": {"window_tokens": 60}}']
    stock_cfg, sinks_cfg = _engine_config(base), _engine_config(base + sinks)
    assert sinks_cfg.model_config.max_model_len == stock_cfg.model_config.max_model_len == 656
    budget = stock_cfg.scheduler_config.max_num_batched_tokens
    assert budget == 2 * 656 and sinks_cfg.scheduler_config.max_num_batched_tokens == budget


def test_bad_sinks_config_fails_at_startup(model_dir):
    from vllm_sinks.config import SinksConfigError

    with pytest.raises(SinksConfigError, match="unknown key"):
        _engine_config(
            [
                "--model",
                model_dir(),
                "--attention-backend",
                "SINKS",
                "--additional-config",
                '{"sinks": {"window": 8}}',
            ]
        )
    with pytest.raises(SinksConfigError, match="keep one"):
        _engine_config(
            [
                "--model",
                model_dir(),
                "--attention-backend",
                "SINKS",
                "--additional-config",
                '{"sinks": {"window_tokens": 60, "attention_sink_window_size": 60}}',
            ]
        )
    with pytest.raises(SinksConfigError, match="trained context"):
        _engine_config(
            [
                "--model",
                model_dir(),
                "--attention-backend",
                "SINKS",
                "--additional-config",
                '{"sinks": {"window_tokens": 4000}}',
            ]
        )


def _with_config(path: str, out, **changes) -> str:
    out.mkdir()
    for name in os.listdir(path):
        (out / name).write_bytes((open(os.path.join(path, name), "rb")).read())
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def test_models_with_their_own_sliding_window(model_dir, tmp_path):
    """A uniform native window (Mistral) is replaced by SINKS' cache when S + W fits inside it; a larger
    S + W and hybrid sliding/full models (Gemma 2/3) fail with what to change."""
    path = model_dir()
    layers = json.loads(open(os.path.join(path, "config.json")).read())["num_hidden_layers"]
    uniform = _with_config(path, tmp_path / "uniform", sliding_window=256,
                           layer_types=["sliding_attention"] * layers)  # fmt: skip
    sinks = ["--attention-backend", "SINKS", "--block-size", "16", "--additional-config"]
    cfg = _engine_config(["--model", uniform, *sinks, '{"sinks": {"window_tokens": 200}}'])
    assert cfg.model_config.max_model_len == 131072
    from vllm_sinks.config import SinksConfigError

    with pytest.raises(SinksConfigError, match="sliding window of 256 tokens; choose .* <= 255"):
        _engine_config(["--model", uniform, *sinks, '{"sinks": {"window_tokens": 252}}'])
    hybrid = _with_config(path, tmp_path / "hybrid", sliding_window=64,
                          layer_types=["sliding_attention", "full_attention"] * (layers // 2))  # fmt: skip
    with pytest.raises(ValueError, match="mix sliding-window and full-attention layers"):
        _engine_config(["--model", hybrid, *sinks, '{"sinks": {"window_tokens": 60}}'])


def test_cpu_selection_validates_instead_of_falling_back():
    """vLLM's CPU platform ignores a requested backend; under SINKS it must validate or fail."""
    import torch
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_sinks.config import BACKEND_PATH

    ok = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=16)
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["SINKS"], ok) == BACKEND_PATH
    for bad, reason in [
        (ok._replace(head_size=40), "head_size"),
        (ok._replace(use_mla=True), "MLA"),
        (ok._replace(kv_cache_dtype="fp8"), "kv_cache_dtype"),
        (ok._replace(attn_type="encoder_decoder"), "attention type"),
    ]:
        with pytest.raises(ValueError, match=reason):
            CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["SINKS"], bad)
    # A model's own window is accepted at this level (config.py checks that S + W fits inside it).
    windowed = ok._replace(has_sliding_window=True)
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["SINKS"], windowed) == BACKEND_PATH
    # Without SINKS the CPU platform behaves as before.
    assert "cpu_attn" in CpuPlatform.get_attn_backend_cls(None, ok)


def test_metrics_plugin_is_inert_without_sinks():
    """Installed but not selected: the stat-logger plugin registers no vllm_sinks:* metric and removes none
    that another engine or the session server registered in the same process (the registry is unchanged)."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY, Gauge

    from vllm_sinks.metrics import SinksStatLogger

    def sinks_collectors() -> set:
        return {c for c in REGISTRY._collector_to_names if getattr(c, "_name", "").startswith("vllm_sinks:")}

    other = Gauge("vllm_sinks:test_other_engine", "a SINKS metric some other engine registered")
    try:
        before = sinks_collectors()
        config = SimpleNamespace(attention_config=SimpleNamespace(backend=None),
                                 model_config=SimpleNamespace(served_model_name="m"))  # fmt: skip
        logger = SinksStatLogger(config, [0])
        logger.record(None, None)
        assert sinks_collectors() == before and other in before
    finally:
        REGISTRY.unregister(other)
