"""Entry point of the `vllm.general_plugins` group (see pyproject.toml).

vLLM calls `register()` in every process that builds an engine, worker or CLI parser (API server, engine
core, workers, Ray workers). It checks the vLLM version and installs the SINKS backend and KV-cache policy;
the patches are inert unless `--attention-backend SINKS` is selected.
"""

from __future__ import annotations


def register() -> None:
    from vllm_sinks import compat

    compat.check_vllm_version()
    compat.apply_patches()
