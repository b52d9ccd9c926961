"""Chat affinity across replicas: every turn of a chat reaches the replica that holds its SINKS state.

affinity.py  the chat key of a request and the placement of chats on replicas (pure logic);
proxy.py     an OpenAI-compatible router in front of N `vllm serve` replicas, sessions included;
ray_serve.py the same placement as a Ray Serve request router, and the LLMConfig of SINKS replicas for Ray
             Serve LLM (imports Ray: not imported here);
__main__.py  `python -m vllm_sinks.routing --replica URL --replica URL ...`.
"""

from vllm_sinks.routing.affinity import AffinityTable, chat_key

__all__ = ["AffinityTable", "chat_key"]
