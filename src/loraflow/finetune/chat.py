"""Chat records through the model's chat template: the checks on ``messages``, rendering them, and
finding the assistant turns to train on, first as character spans of the text, then as token spans.

Nothing here builds labels: ``data`` turns the token spans into per-token targets.
"""

from __future__ import annotations

from loraflow.finetune.records import JSON_TYPES

ROLES = ("system", "user", "assistant", "tool")


def encode(tokenizer, text: str) -> list[int]:
    """``text``'s token ids without the special tokens the tokenizer's normal call adds."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_messages(messages, at: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{at}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} objects")
    for k, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ValueError(f"{at}: message {k} has the role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            kind = JSON_TYPES.get(type(m.get("content")), "null")
            raise ValueError(f"{at}: the content of message {k} ({m['role']}) is {kind}, not a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            f"{at} has no assistant turn: nothing to learn from it; add the assistant's reply or remove the record"
        )
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{at} starts with an assistant turn: start the conversation with a system or user message")
    return messages


def render(tokenizer, messages: list[dict], at: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's TemplateError, or a template's raise_exception ("roles must alternate")
        raise ValueError(f"{at}: the model's chat template refused this conversation: {e}") from None


def assistant_targets(messages, tokenizer, at: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and the token spans to train on: each assistant turn and its end-of-turn token.

    For assistant message i, the text of ``messages[:i]`` with the generation prompt must be a prefix of
    the text of ``messages[:i + 1]``: the characters between them are the turn. Tokens after the last
    eos in a turn (SmolLM2's newline after ``<|im_end|>``) are template, not reply, so they are left out.
    """
    messages = check_messages(messages, at)
    full = render(tokenizer, messages, at)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], at, generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], at)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"{at}: the model's chat template does not render this conversation turn by turn (the text before "
                f"message {i + 1} is not a prefix of the text with it), so the assistant turns cannot be found: "
                "use prompt/completion records instead"
            )
        spans.append((len(before), len(through)))
    ids, spans = token_spans(tokenizer, full, spans, at)
    targets = []
    for start, end in spans:
        turn = ids[start:end]
        if tokenizer.eos_token_id in turn:
            end = start + len(turn) - turn[::-1].index(tokenizer.eos_token_id)
        targets.append((start, end))
    return ids, targets


def token_spans(tokenizer, text: str, spans: list[tuple[int, int]], at: str):
    """``text``'s token ids and the token spans of the character ``spans``.

    Token counts of the prefixes when their tokens are a prefix of the whole (the usual case); else
    (a merge across a boundary, such as a reply starting with a blank line) the tokens' character offsets,
    where a token straddling a boundary belongs to the turn.
    """
    ids = encode(tokenizer, text)
    counts = {}
    for cut in sorted({c for span in spans for c in span}):
        prefix = encode(tokenizer, text[:cut])
        if ids[: len(prefix)] != prefix:
            break
        counts[cut] = len(prefix)
    else:
        return ids, [(counts[s], counts[e]) for s, e in spans]
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        raise ValueError(
            f"{at}: the assistant turns cannot be located in the tokens (a slow tokenizer without character "
            "offsets): use a fast tokenizer or prompt/completion records"
        ) from None
    result = []
    for s, e in spans:
        inside = [j for j, (a, b) in enumerate(offsets) if b > s and a < e]
        result.append((inside[0], inside[-1] + 1) if inside else (0, 0))
    return ids, result
