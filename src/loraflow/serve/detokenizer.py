"""The text side of generation: each new token's text, stop conditions, and what a stream may
show so far. Decoding a whole output every step grows with its length; this decodes a short
window of ids a token (vLLM's incremental detokenization) and holds back text that could
still change: an unfinished multi-byte character, or the start of a stop string."""

from __future__ import annotations

from loraflow.serve.request import Request


class Detokenizer:
    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        # a few ids per request and step: straight to the Rust tokenizer (transformers' wrapper
        # costs ~30 us a call) when its clean-up step would not change the text
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._windows_decode = backend.decode_batch if plain else tokenizer.batch_decode

    def add(self, req: Request, token: int, max_len: int) -> str | None:
        """Account for ``token`` (already in ``req.output_ids``): the reason the request ends
        ("stop", "length") or None. The text is extended here only for a request with stop
        strings (they are looked for in it); a finished request gets its whole text; the
        others' text is the caller's to extend (``append_text``), off the step's critical path."""
        p = req.params
        if token in self.eos_ids and not p.ignore_eos:
            req.output_ids.pop()
            req.text = self.decode(req)
            return "stop"
        if p.stop:
            self.append_text(req)
            for s in p.stop:
                at = req.text.find(s)
                if at >= 0:
                    req.text = req.text[:at]
                    return "stop"
        if len(req.output_ids) >= p.max_tokens or req.n_tokens >= max_len:
            req.text = self.decode(req)
            return "length"
        return None

    def append_text(self, req: Request) -> None:
        self.append_texts([req])

    def append_texts(self, reqs: list[Request]) -> None:
        """Extend each request's ``text`` by its new tokens' text, decoding only a short window:
        the text of ids[prefix:] minus that of ids[prefix:read] (a token's text can depend on its
        neighbours), held back while it ends in an unfinished multi-byte character. Two decode
        calls for all the requests (the Rust side decodes them in parallel), not two a request."""
        if not reqs:
            return
        windows = [r.output_ids[r.prefix_offset : r.read_offset] for r in reqs]
        windows += [r.output_ids[r.prefix_offset :] for r in reqs]
        texts = self._windows_decode(windows, skip_special_tokens=True)
        for req, before, after in zip(reqs, texts[: len(reqs)], texts[len(reqs) :]):
            if len(after) > len(before) and not after.endswith("\ufffd"):
                req.text += after[len(before) :]
                req.prefix_offset, req.read_offset = req.read_offset, len(req.output_ids)

    def decode(self, req: Request) -> str:
        return self.tokenizer.decode(req.output_ids, skip_special_tokens=True)

    def stream_text(self, req: Request) -> str:
        """The text safe to show so far: holds back what could still become a stop string
        or an unfinished multi-byte character."""
        if req.finished:
            return req.text
        hold = max((len(s) - 1 for s in req.params.stop), default=0)
        text = req.text[: len(req.text) - hold] if hold else req.text
        return text.rstrip("\ufffd")
