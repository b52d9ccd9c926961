"""SinksConfig parsing and validation: every bad value fails with a message that says what to change."""

from __future__ import annotations

import pytest

from vllm_sinks.config import SinksConfig, SinksConfigError, parse_sinks_config


def test_defaults_match_attention_sinks():
    assert parse_sinks_config({}, environ={}) == SinksConfig(sink_tokens=4, window_tokens=1020)


def test_additional_config_wins_over_environment():
    env = {"VLLM_SINKS_SINK_TOKENS": "2", "VLLM_SINKS_WINDOW_TOKENS": "100"}
    assert parse_sinks_config({}, environ=env) == SinksConfig(2, 100)
    cfg = parse_sinks_config({"sinks": {"window_tokens": 60}}, environ=env)
    assert cfg == SinksConfig(2, 60)
    assert parse_sinks_config('{"sinks": {"sink_tokens": 0}}', environ={}) == SinksConfig(0, 1020)


@pytest.mark.parametrize(
    "additional, env, message",
    [
        ({"sinks": {"sink_token": 4}}, {}, "unknown key(s) ['sink_token']"),
        ({"sinks": {"sink_tokens": "four"}}, {}, "sink_tokens must be an integer"),
        ({"sinks": {"window_tokens": 1.5}}, {}, "window_tokens must be an integer"),
        ({"sinks": {"sink_tokens": True}}, {}, "sink_tokens must be an integer"),
        ({"sinks": {"sink_tokens": -1}}, {}, "sink_tokens=-1 must be >= 0"),
        ({"sinks": {"window_tokens": 0}}, {}, "window_tokens=0 must be >= 1"),
        ({"sinks": [4, 1020]}, {}, '"sinks" must be an object'),
        ("{not json", {}, "not valid JSON"),
        (
            {},
            {"VLLM_SINKS_WINDOW_TOKENS": "big"},
            "VLLM_SINKS_WINDOW_TOKENS: window_tokens must be an integer",
        ),
    ],
)
def test_bad_values_say_what_to_change(additional, env, message):
    with pytest.raises(SinksConfigError) as e:
        parse_sinks_config(additional, environ=env)
    assert message in str(e.value)


def test_attention_sinks_names_are_aliases():
    names = {"sinks": {"attention_sink_size": 4, "attention_sink_window_size": 252}}
    assert parse_sinks_config(names, environ={}) == SinksConfig(4, 252)
    mixed = {"sinks": {"attention_sink_size": 2, "window_tokens": 100}}
    assert parse_sinks_config(mixed, environ={}) == SinksConfig(2, 100)
    sink_twice = {"sink_tokens": 4, "attention_sink_size": 4}
    for both in (sink_twice, {"window_tokens": 9, "attention_sink_window_size": 2}):
        with pytest.raises(SinksConfigError, match="gives both .* keep one"):
            parse_sinks_config({"sinks": both}, environ={})


def test_model_dependent_checks():
    SinksConfig(4, 60).validate_for(max_position_embeddings=2048)
    SinksConfig(4, 8).validate_for(max_position_embeddings=2048)  # a window within one block works too
    with pytest.raises(SinksConfigError, match="reaches the model's trained context"):
        SinksConfig(4, 2044).validate_for(max_position_embeddings=2048)
    # A model's own sliding window (Mistral-7B-v0.1: 4096) is replaced when S + W fits inside it.
    SinksConfig(4, 4091).validate_for(max_position_embeddings=32768, sliding_window=4096)
    with pytest.raises(SinksConfigError, match="inside the model's own sliding window of 4096 .* <= 4095"):
        SinksConfig(4, 4092).validate_for(max_position_embeddings=32768, sliding_window=4096)


def test_block_bound():
    cfg = SinksConfig(4, 60)
    # ceil(4/16) + ceil((60 + 64)/16) + 1
    assert cfg.max_blocks_per_request(16, 64) == 1 + 8 + 1
    assert SinksConfig(0, 60).max_blocks_per_request(16, 1) == 0 + 4 + 1


def test_band_tiling_override_is_validated(monkeypatch):
    """VLLM_SINKS_BAND_TILING picks band_sink_attention's launch shape; a malformed one is refused with what
    to write instead, never silently replaced by the default."""
    from vllm_sinks.attention.ops_cuda import BandTiling

    monkeypatch.setenv("VLLM_SINKS_BAND_TILING", "128,32,8,2")
    assert BandTiling.from_env() == BandTiling(rows=128, keys=32, num_warps=8, num_stages=2)
    for bad in ("64,64,4", "48,64,4,3", "64,64,3,3", "64,64,4,0", "a,b,c,d"):
        monkeypatch.setenv("VLLM_SINKS_BAND_TILING", bad)
        with pytest.raises(ValueError, match="rows,keys,num_warps,num_stages"):
            BandTiling.from_env()
    monkeypatch.delenv("VLLM_SINKS_BAND_TILING")
    assert BandTiling.from_env() == BandTiling()


def test_live_session_cap_leaves_request_slots():
    """A live session waiting for its next message holds one of the engine's max_num_seqs request slots (vLLM
    counts it against the limit), so the HTTP server's cap stays below max_num_seqs: half of it by default,
    and a VLLM_SINKS_MAX_SESSIONS that would take every slot fails at start-up with what to change."""
    from vllm_sinks.sessions.server import SessionLimits

    assert SessionLimits.from_env({}).max_sessions == 64
    assert SessionLimits.from_env({}, max_num_seqs=256).max_sessions == 64
    assert SessionLimits.from_env({}, max_num_seqs=8).max_sessions == 4
    assert SessionLimits.from_env({}, max_num_seqs=1).max_sessions == 0
    assert SessionLimits.from_env({"VLLM_SINKS_MAX_SESSIONS": "7"}, max_num_seqs=8).max_sessions == 7
    with pytest.raises(ValueError, match="choose 0 to 7 or raise --max-num-seqs"):
        SessionLimits.from_env({"VLLM_SINKS_MAX_SESSIONS": "8"}, max_num_seqs=8)
