"""One conversation as one token stream: the chat template's text for a user turn, first or appended.

The first user message goes through the template with the generation prompt; every later one is appended
after the assistant's reply as the template's own between-turns text (closing the reply, opening a user turn)
+ the message + the text that opens the assistant's turn, both read off the template. Shared by the HTTP
sessions (vllm_sinks.sessions.server) and examples/streaming_demo.py.
"""

from __future__ import annotations

from typing import Any


def chat_pieces(tokenizer: Any) -> tuple[str, str] | None:
    """(text closing an assistant turn and opening a user turn, text closing the user turn and opening the
    assistant's), read off the tokenizer's chat template; None when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    msgs = [{"role": "user", "content": "X"}, {"role": "assistant", "content": "@@A@@"},
            {"role": "user", "content": "@@U@@"}]  # fmt: skip
    full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return full[full.index("@@A@@") + 5 : full.index("@@U@@")], full[full.index("@@U@@") + 5 :]


def user_turn(tokenizer: Any, content: str, pieces: tuple[str, str] | None = None) -> list[int]:
    """Token ids that add the user message `content`: through the template when `pieces` is None (the
    conversation's first message), else appended after a reply with `pieces` = chat_pieces(tokenizer)."""
    if pieces is None:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    else:
        text = pieces[0] + content + pieces[1]
    return tokenizer.encode(text, add_special_tokens=False)
