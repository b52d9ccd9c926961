"""SINKS under Ray Serve LLM: an `LLMConfig` whose engines run SINKS, and a Ray Serve request router that
sends every turn of a chat to the replica holding its state.

`sinks_llm_config(...)` builds the `ray.serve.llm.LLMConfig` (engine `attention_backend="SINKS"` with the
sinks config, `ChatAffinityRouter` as the deployment's request router); `build_openai_app` serves it. vLLM
loads the plugin in every replica from the installed package's entry points, so a cluster needs
`vllm_sinks` installed on every node (or in the deployment's `runtime_env`).

`ChatAffinityRouter` keys a request like vllm_sinks.routing.affinity: Ray Serve's session id (the
`x-session-id` header, which Ray Serve LLM's ingress forwards as the handle's session id), else the OpenAI
`user` field, else the chat's first messages (what SINKS keeps as sinks). A chat seen before goes back to its
replica while that replica is alive and waits there when the replica is at `max_ongoing_requests` (Ray Serve
backs off and retries: a returning chat is never shed); a new chat is offered the replicas in its rendezvous
order, those holding `balance` x the mean number of chats moved last (affinity.balanced_order), one rank
each, so Ray Serve places it on the first one with room (a full replica sheds new chats). The chat counts
change when Ray Serve reports a request routed: new chats that arrive together, before any is routed, are
ordered by the same counts.
The replica a request reached is remembered when Ray Serve reports it routed (`on_request_routed`). A replica
that dies or is scaled down drops out of the candidates: its chats' next turns go to their next choice, where
they re-prefill once.

Invariants: `choose_replicas` returns only candidate replicas; a key maps to one replica at a time; at most
`max_keys` keys are remembered (least recently used forgotten); `chats[replica]` is the number of keys
remembered on that replica.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from vllm_sinks.routing.affinity import (
    BALANCE,
    PREFIX_CHARS,
    PREFIX_TOKENS,
    balanced_order,
    chat_key,
    remember_placement,
)

ROUTER_CLASS = "vllm_sinks.routing.ray_serve:ChatAffinityRouter"


def _body(pending_request: PendingRequest) -> Mapping[str, Any] | None:
    """The parts of the OpenAI request body (a pydantic model among a Ray Serve LLM handle call's arguments)
    that chat_key reads: the messages up to the first user message, the prompt's start, `user`. A long chat
    costs the router no more than a short one."""
    for arg in pending_request.args:
        if hasattr(arg, "messages") or hasattr(arg, "prompt"):
            messages = getattr(arg, "messages", None)
            if isinstance(messages, list):
                first: list[Any] = []
                for message in messages:
                    first.append(message)
                    if _role(message) == "user":
                        break
                messages = first
            prompt = getattr(arg, "prompt", None)
            if isinstance(prompt, str | list):
                prompt = prompt[: max(PREFIX_CHARS, PREFIX_TOKENS)]
            fields = {"messages": messages, "prompt": prompt, "user": getattr(arg, "user", None)}
            # Message objects (pydantic or dicts) to plain JSON, as the HTTP proxy's chat_key sees them.
            return json.loads(json.dumps(fields, default=_plain))
    return None


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else getattr(message, "role", None)


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump(exclude_none=True) if dump is not None else str(value)


def request_key(pending_request: PendingRequest | None) -> str | None:
    """A request's chat key (affinity.chat_key), None when the request carries none. Computed once per
    request (kept on its routing context): Ray Serve asks the router again at every backoff, and once more
    when the request is routed."""
    if pending_request is None:
        return None
    context = pending_request.routing_context
    if not hasattr(context, "vllm_sinks_key"):
        session = pending_request.metadata.session_id
        headers = {"x-session-id": session} if session else {}
        context.vllm_sinks_key, _ = chat_key(_body(pending_request) or {}, headers)
    return context.vllm_sinks_key


class ChatAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve request router: each chat to the replica holding its SINKS state (module docstring).

    Ray Serve may run a routing task with no request of its own (`pending_request` None: its request was
    taken over while it backed off); FIFOMixin then hands the replica it finds to the oldest waiting request.
    Such a task chooses for that oldest request, so the hand-over keeps the request's chat on its replica
    (without the mixin the waiting request is never routed and the task spins without backing off)."""

    def initialize_state(self, max_keys: int = 1_000_000, balance: float = BALANCE) -> None:
        self.max_keys = max_keys
        self.balance = balance
        self.placed: OrderedDict[str, str] = OrderedDict()  # chat key -> replica id (full id string)
        self.chats: dict[str, int] = {}  # replica id -> keys remembered on it

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            # The queue FIFOMixin serves: a private attribute of Ray 2.58's RequestRouter (check on upgrade).
            waiting = (r for r in self._pending_requests_to_fulfill if not r.future.done())
            pending_request = next(waiting, None)
        if pending_request is not None:
            # The ranks below are all this router offers: when none has room, Ray Serve must back off before
            # it asks again (else it re-probes in a tight loop that starves the replicas it waits for).
            pending_request.routing_context.should_backoff = True
        key = request_key(pending_request)
        if key is None:
            return [candidate_replicas]  # Ray Serve picks the least loaded of the rank
        by_id = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        home = self.placed.get(key)
        if home is not None and home in by_id:
            self.placed.move_to_end(key)
            return [[by_id[home]]]
        chats = {name: self.chats.get(name, 0) for name in by_id}
        return [[by_id[name]] for name in balanced_order(key, chats, self.balance)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:  # fmt: skip
        key = request_key(pending_request)
        if key is None:
            return
        remember_placement(self.placed, self.chats, key, replica_id.to_full_id_str(), self.max_keys)


def sinks_llm_config(
    model_id: str,
    model_source: str,
    sink_tokens: int = 4,
    window_tokens: int = 1020,
    *,
    num_replicas: int | Mapping[str, Any] = 1,
    engine_kwargs: Mapping[str, Any] | None = None,
    affinity: bool = True,
    **llm_config: Any,
):
    """A `ray.serve.llm.LLMConfig` serving `model_source` with SINKS (`sink_tokens` + `window_tokens`) on
    `num_replicas` replicas (or an autoscaling config), routed by ChatAffinityRouter unless `affinity` is
    False (then Ray Serve's default, power of two choices). `engine_kwargs` are vLLM's engine arguments;
    other keyword arguments go to LLMConfig (accelerator_type, placement_group_config, runtime_env, ...)."""
    from ray.serve.llm import LLMConfig

    engine = dict(engine_kwargs or {})
    sinks = {"sink_tokens": sink_tokens, "window_tokens": window_tokens}
    given = engine.get("attention_backend", "SINKS")
    if given != "SINKS":
        raise ValueError(f"sinks_llm_config serves SINKS; engine_kwargs names attention_backend={given!r}: "
                         "drop it, or build a plain LLMConfig for another backend")  # fmt: skip
    additional = dict(engine.get("additional_config") or {})
    additional["sinks"] = {**sinks, **additional.get("sinks", {})}
    engine |= {"attention_backend": "SINKS", "additional_config": additional}
    engine.setdefault("enable_prefix_caching", True)
    deployment = dict(llm_config.pop("deployment_config", {}) or {})
    if isinstance(num_replicas, Mapping):
        deployment["autoscaling_config"] = dict(num_replicas)
    else:
        deployment["num_replicas"] = num_replicas
    if affinity:
        deployment["request_router_config"] = {"request_router_class": ROUTER_CLASS}
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_source},
        engine_kwargs=engine,
        deployment_config=deployment,
        **llm_config,
    )
