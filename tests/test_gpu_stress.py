"""The stress test of tests/test_stress.py on a CUDA GPU: the Llama-3-8B shape (dummy weights, bf16, CUDA
graphs), model runner V2 (vLLM's GPU default) running every step for real, sparse block rows and vLLM's
lists, a small pool and max_num_seqs 8 with bursts past it. Checked: no exception in any step (V2's staging
overflow killed the engine on 5422dd8), every request finished or was aborted, blocks held within
SinksConfig.max_blocks_per_request at every step, every block back in the pool, and finished streams served
alone (teacher-forced) choose the same tokens within GPU_TIE nats in bf16.
    STRESS_STEPS=600 python -m pytest -s tests/test_gpu_stress.py
"""

from __future__ import annotations

import os
import random
import sys

import pytest
from engines import shut_down
from stress_driver import Driver, check_alone

pytestmark = pytest.mark.gpu
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

S, W = 4, 60
STEPS = int(os.environ.get("STRESS_STEPS", 600))
MAX_MODEL_LEN = 8192
MAX_SEQS = 8
GPU_TIE = 0.05  # bf16: a batched decode and a lone prefill round differently


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from model_shapes import model_dir
    from vllm import LLM

    llm = LLM(
        model=model_dir(str(tmp_path_factory.mktemp("shapes")), "llama3-8b"),
        load_format="dummy",
        attention_backend="SINKS",
        dtype="bfloat16",
        block_size=16,
        max_num_seqs=MAX_SEQS,
        max_num_batched_tokens=256,
        max_model_len=MAX_MODEL_LEN,
        enable_prefix_caching=True,
        num_gpu_blocks_override=40 * MAX_SEQS + 30,
        gpu_memory_utilization=0.5,
        additional_config={"sinks": {"sink_tokens": S, "window_tokens": W}},
    )
    yield llm
    shut_down(llm)
    del llm
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)


@pytest.mark.parametrize("rows", ["sparse", "lists"])
def test_random_traffic_on_model_runner_v2(engine, rows):
    from vllm_sinks.kv.introspection import sink_managers

    llm = engine
    assert llm.llm_engine.vllm_config.use_v2_model_runner, "the engine did not use model runner V2"
    llm.reset_prefix_cache()
    (manager,) = sink_managers(llm)
    free_before = manager.block_pool.get_num_free_blocks()
    driver = Driver(llm, random.Random(f"gpu-{rows}"), None, rows == "sparse", (S, W), MAX_MODEL_LEN)
    stats = driver.run(STEPS)
    driver.check_end(free_before)
    checked, ties = check_alone(llm, driver.streams(), tie=GPU_TIE)
    print(f"GPU {rows}, max_num_seqs {MAX_SEQS}: {STEPS} steps, {stats}; {checked} tokens equal to the "
          f"streams served alone ({ties} not the argmax there, within {GPU_TIE})")  # fmt: skip
    # (On a GPU a prefill takes one or two steps: an abort rarely lands in one; on the H100 of 2026-12-06 none
    # did in 600 steps with sparse rows.)
    assert stats["preempted"] and stats["aborted_decode"] and checked
    if rows == "sparse":
        assert stats["sparse_rows"], "no request reached the worker as a sparse row"
