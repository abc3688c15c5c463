"""A request as the engine tracks it, the errors that refuse or fail one, and the
end-of-sequence ids a model stops on."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraflow.serve.sampling import SamplingParams


class QueueFull(Exception):
    """The waiting queue is full: retry later."""


class PromptError(ValueError):
    """A prompt the engine cannot run (empty, a token id outside the vocabulary)."""


class ContextTooLong(PromptError):
    """The prompt and ``max_tokens`` together exceed the context."""


# request.error_type -> what failed: the request's adapter, the server's memory, a step of the
# engine itself, the request's own time limit, or this request's sampling (non-finite logits)
ERROR_TYPES = ("adapter", "capacity", "engine", "timeout", "request")


@dataclass(eq=False)  # identity: the scheduler's membership tests stay O(1) per comparison
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    on_output: Callable[[Request], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    error_type: str | None = None  # one of ERROR_TYPES
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are cached
    slot: int = -1
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    deadline: float = float("inf")  # perf_counter time after which it fails with "timeout"
    logprobs: list = field(default_factory=list)  # per output token: (id, logprob, [(id, logprob), ...])
    prefix_offset: int = 0  # incremental detokenization: output ids[prefix_offset:read_offset]
    read_offset: int = 0  # were decoded into the tail of ``text``

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def eos_ids(folder: Path | None, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (which may list several)."""
    ids = {tokenizer.eos_token_id} - {None}
    for name in ("generation_config.json", "config.json") if folder is not None else ():
        if (folder / name).is_file():
            eos = json.loads((folder / name).read_text()).get("eos_token_id")
            ids |= set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
    return ids
