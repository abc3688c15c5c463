"""OpenAI request bodies as the server accepts them, and the log-probability objects of its answers.

Supported request fields (anything else is refused with 400 naming the field, never ignored):

    both:         model, max_tokens, temperature, top_p, seed, stop, stream, stream_options,
                  n (1 only), frequency_penalty, presence_penalty, user / metadata / store
                  (accepted; they do not change the output), and vLLM's top_k,
                  repetition_penalty, ignore_eos
    completions:  prompt (a string, a one-string list, or a list of token ids), echo, logprobs (0-5)
    chat:         messages, max_completion_tokens, logprobs (bool), top_logprobs (0-20)
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraflow.serve.sampling import SEED_MAX, SEED_MIN

# accepted and without effect on the output (OpenAI's tracking fields)
NO_EFFECT = {"user", "metadata", "store", "service_tier"}


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens

    def unsupported(self) -> list[str]:
        """Fields this server does not implement that the request sets (to a value other than null)."""
        extra = [k for k, v in (self.model_extra or {}).items() if v is not None and k not in NO_EFFECT]
        return sorted(extra) + (["n"] if self.n != 1 else [])


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)


class ChatBody(Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# the longest lora_path accepted (Linux's PATH_MAX)
MAX_PATH_CHARS = 4096


class LoadBody(BaseModel):
    lora_name: str = Field(max_length=128)
    lora_path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)

    @field_validator("lora_name", "lora_path")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value


class UnloadBody(BaseModel):
    lora_name: str


def completion_logprobs(records: list, piece, offset: int = 0) -> dict:
    """The completions API's ``logprobs`` object for records (id, logprob, [(id, logprob)]);
    ``piece(id)`` is a token's text, ``offset`` where the first token's text starts."""
    tokens = [piece(t) for t, _, _ in records]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in records],
        "top_logprobs": [{piece(i): lp for i, lp in alts} for _, _, alts in records],
        "text_offset": offsets,
    }


def chat_logprobs(records: list, piece) -> dict:
    """The chat API's ``logprobs`` object: per token its text, log-probability, UTF-8 bytes and alternatives."""

    def entry(token: int, lp: float) -> dict:
        text = piece(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, a) for i, a in alts]} for t, lp, alts in records]}
