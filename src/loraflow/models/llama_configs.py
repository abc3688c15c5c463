"""LLaMA configurations of the GaLore paper (Zhao et al., 2024, Table 2 and their configs),
for pre-training from scratch."""

from __future__ import annotations

SIZES = {  # hidden, intermediate, heads, layers
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
    "tiny": (64, 172, 4, 2),  # for tests and smoke runs
}


def llama_config(size: str, vocab_size: int = 32000, max_seq_len: int = 1024, **overrides):
    """A transformers ``LlamaConfig`` of the paper's size ``size``."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    hidden, inter, heads, layers = SIZES[size]
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaConfig(**{**cfg, **overrides})
