"""Entry point of the `vllm.general_plugins` group (see pyproject.toml).

vLLM calls `register()` in every process that builds an engine, worker or CLI parser (API server, engine
core, workers, Ray workers). It checks the vLLM version and installs the patches of vllm_sinks/patch/ (the
backend's name, the KV-cache policy, the hand-offs); they are inert unless `--attention-backend SINKS` is
selected.
"""

from __future__ import annotations


def register() -> None:
    from vllm_sinks import patch

    patch.check_vllm_version()
    patch.apply_patches()
