"""Live sessions: one vLLM request that receives message after message (Session), its HTTP server
(/v1/sessions) and the int32 storage of a long session's token ids."""

from vllm_sinks.sessions.session import Reply, Session, SessionBusyError, SessionClosedError, SessionError

__all__ = ["Reply", "Session", "SessionBusyError", "SessionClosedError", "SessionError"]
