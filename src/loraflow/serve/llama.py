"""A compact Llama-family decoder for serving (gpt-fast style): Llama 2/3, SmolLM2, Mistral,
Qwen2 from a local Hugging Face folder, with a paged KV cache and per-token adapters.

One forward runs a packed batch of tokens from many sequences (prefill chunks and decode
steps together). Every linear layer adds, for token t with adapter slot s_t (−1: none),
Δy_t = B_{s_t} A_{s_t} x_t read from the adapter bank (serve/bank.py).

    h = x + Attn(RMSNorm(x)),  y = h + W_down(silu(W_gate n) ∘ W_up n),  n = RMSNorm(h)
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from loraflow.serve.bank import BankedLinear, Fused, TokenSlots, banked_siblings, fuse_siblings
from loraflow.serve.pointwise import EAGER, Pointwise

# Attention of steps with prompt chunks: every backend but cuDNN's, which builds an execution
# plan for each new shape (hundreds of milliseconds), while these shapes (sequences, new
# tokens, context) change from one step to the next. The decode steps use their own kernel.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

try:
    from loraflow.serve.paged_attention import paged_decode_attention
except ImportError:  # no Triton: decode steps use the gathered-context path
    paged_decode_attention = None

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class LlamaArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_seq_len: int
    tie_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool

    @staticmethod
    def from_hf(cfg: dict) -> LlamaArgs:
        kind = cfg.get("model_type")
        if kind not in SUPPORTED:
            raise ValueError(f"model_type {kind!r} is not served; loraflow serves {SUPPORTED}")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default and llama3 are)")
        n_heads = cfg["num_attention_heads"]
        return LlamaArgs(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )


def rope_frequencies(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's long-context scaling when configured."""
    inv = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim)
    s = args.rope_scaling
    if s:
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, pw: Pointwise = EAGER) -> torch.Tensor:
        return pw.rms_norm(x, self.weight, self.eps)  # w ∘ x / √(mean(x²) + ε)


@dataclass
class AttnGroup:
    """Sequences whose new tokens are padded to one length for attention. A step's decode
    sequences (one new token) and its prompt chunks form separate groups, so a long chunk
    does not pad every decode query to its length."""

    tokens: torch.Tensor  # (n,) packed index of the group's new tokens
    q_index: torch.Tensor  # (S, q_max) packed index of each sequence's new tokens (0: pad)
    kv_index: torch.Tensor  # (S, ctx_max) flat KV-cache rows of each sequence's context
    mask: torch.Tensor  # (S, 1, q_max, ctx_max) bool: query may see key
    out_index: torch.Tensor  # (n,) where each of ``tokens`` sits in (S * q_max)


@dataclass
class Batch:
    """One step's packed tokens and where their keys and values live (built by the engine).
    Steps with prompt chunks use the gathered-context fields; decode-only steps (one new
    token per sequence) use the block tables, read by the paged attention kernel."""

    tokens: torch.Tensor  # (N,) token ids
    positions: torch.Tensor  # (N,) position of each token in its sequence
    slots: TokenSlots  # adapter slot of each token (-1: base model), grouped once per step
    cache_index: torch.Tensor  # (N,) flat KV-cache row of each new token
    groups: list[AttnGroup] | None = None  # steps with prompt chunks: sequences padded together
    logit_index: torch.Tensor | None = None  # (S',) packed index of the tokens whose logits are needed; None: all
    block_table: torch.Tensor | None = None  # decode: (N, max_blocks) int32 block ids of each sequence
    seq_lens: torch.Tensor | None = None  # decode: (N,) context length, the new token included
    block_size: int = 0
    attention_splits: int = 1  # decode: programs per (sequence, KV head) of the paged kernel
    attention_warps: int = 4  # decode: warps per program of the paged kernel


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.a = a
        self.n_heads, self.n_kv_heads = a.n_heads, a.n_kv_heads  # this rank's share under tensor parallelism
        self.q_proj = BankedLinear(a.dim, a.n_heads * a.head_dim, a.qkv_bias)
        self.k_proj = BankedLinear(a.dim, a.n_kv_heads * a.head_dim, a.qkv_bias)
        self.v_proj = BankedLinear(a.dim, a.n_kv_heads * a.head_dim, a.qkv_bias)
        self.o_proj = BankedLinear(a.n_heads * a.head_dim, a.dim, False)
        self.qkv: Fused | None = None  # q/k/v's weights as one matrix (``fuse_projections``)

    def forward(self, x, b: Batch, cos, sin, cache_k, cache_v, pw: Pointwise = EAGER):
        """softmax(q kᵀ / √d + mask) v over each sequence's cached context."""
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.a.head_dim
        q, k, v = banked_siblings(x, b.slots, (self.q_proj, self.k_proj, self.v_proj), self.qkv)  # W x + b + B_s A_s x
        q = q.view(-1, H, D)  # (N, H, D)
        k = k.view(-1, Hkv, D)  # (N, Hkv, D)
        v = v.view(-1, Hkv, D)
        q, k = pw.rope_qk(q, k, cos, sin)
        cache_k.index_copy_(0, b.cache_index, k)  # cache: (rows, Hkv, D)
        cache_v.index_copy_(0, b.cache_index, v)
        if b.block_table is not None:  # decode: paged kernel
            o = paged_decode_attention(
                q, cache_k, cache_v, b.block_table, b.seq_lens, b.block_size,
                splits=b.attention_splits, num_warps=b.attention_warps,
            )  # fmt: skip
            return self.o_proj(o.view(-1, H * D), b.slots)
        out = q.new_empty(q.shape[0], H * D)  # (N, H·D)
        for g in b.groups:
            S, q_max = g.q_index.shape
            Q = q[g.q_index].transpose(1, 2)  # (S, H, q_max, D)
            K = cache_k[g.kv_index].transpose(1, 2)  # (S, Hkv, ctx, D)
            V = cache_v[g.kv_index].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                Q,
                K,
                V,
                attn_mask=g.mask,  # backends: SDPA_BACKENDS
                enable_gqa=Hkv != H,
            )
            out[g.tokens] = o.transpose(1, 2).reshape(S * q_max, -1)[g.out_index]
        return self.o_proj(out, b.slots)


class MLP(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.gate_proj = BankedLinear(a.dim, a.intermediate, a.mlp_bias)
        self.up_proj = BankedLinear(a.dim, a.intermediate, a.mlp_bias)
        self.down_proj = BankedLinear(a.intermediate, a.dim, a.mlp_bias)
        self.gate_up: Fused | None = None  # gate/up's weights as one matrix (``fuse_projections``)

    def forward(self, x, slots, pw: Pointwise = EAGER):
        gate, up = banked_siblings(x, slots, (self.gate_proj, self.up_proj), self.gate_up)
        return self.down_proj(pw.silu_mul(gate, up), slots)  # W_down (silu(g) ∘ u)


class Block(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, b, cos, sin, cache_k, cache_v, pw: Pointwise = EAGER):
        a = self.self_attn(self.input_layernorm(x, pw), b, cos, sin, cache_k, cache_v, pw)
        post = self.post_attention_layernorm
        h, n = pw.add_rms_norm(x, a, post.weight, post.eps)  # h = x + a, n = RMSNorm(h)
        return h + self.mlp(n, b.slots, pw)


class Decoder(nn.Module):
    """Module names follow Hugging Face's (``model.layers.0.self_attn.q_proj``), so weight
    files and adapter files map onto it key for key."""

    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)


class Llama(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.args = a
        self.model = Decoder(a)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(a), persistent=False)
        self.pointwise = EAGER  # the element-wise functions, or their compiled kernels (``serve/pointwise.py``)

    def forward(self, b: Batch, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Logits (S', vocab) of the tokens in ``b.logit_index``."""
        angles = b.positions.float()[:, None] * self.inv_freq[None, :]  # (N, D/2)
        angles = torch.cat((angles, angles), dim=-1)
        x = self.model.embed_tokens(b.tokens)  # (N, dim)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        with sdpa_kernel(SDPA_BACKENDS) if b.groups else contextlib.nullcontext():  # once, not per layer
            for layer, (ck, cv) in zip(self.model.layers, caches):
                x = layer(x, b, cos, sin, ck, cv, self.pointwise)
        x = self.model.norm(x if b.logit_index is None else x[b.logit_index], self.pointwise)
        return self.lm_head(x).float()

    def linear_layers(self) -> dict[str, BankedLinear]:
        return {n: m for n, m in self.named_modules() if isinstance(m, BankedLinear)}


def fuse_projections(model: Llama) -> Llama:
    """Give every block one matrix for q/k/v and one for gate/up, each layer's weight a view
    of its rows (no extra memory): with a decode batch of tens of tokens those GEMMs are bound
    by reading the weights, and one GEMM over the stacked rows reads them at a higher rate
    than two or three narrower ones. Call it once the weights sit where they are served
    (after ``.to(device)`` and tensor-parallel sharding, which would copy the views apart)."""
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        attn.qkv = fuse_siblings((attn.q_proj, attn.k_proj, attn.v_proj))
        mlp.gate_up = fuse_siblings((mlp.gate_proj, mlp.up_proj))
    return model


def linear_shapes(a: LlamaArgs) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every linear layer an adapter may target, by module name."""
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    per = {
        "self_attn.q_proj": (q, a.dim),
        "self_attn.k_proj": (kv, a.dim),
        "self_attn.v_proj": (kv, a.dim),
        "self_attn.o_proj": (a.dim, q),
        "mlp.gate_proj": (a.intermediate, a.dim),
        "mlp.up_proj": (a.intermediate, a.dim),
        "mlp.down_proj": (a.dim, a.intermediate),
    }
    return {f"model.layers.{i}.{k}": v for i in range(a.n_layers) for k, v in per.items()}


SHAPES = {  # model shapes for benchmarks with random weights
    "llama2-7b": dict(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        intermediate=11008,
        norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_seq_len=4096,
        tie_embeddings=False,
        qkv_bias=False,
        mlp_bias=False,
    ),
    # the embedded SmolLM2-135M's shape: its speed without the model's files
    "smollm2-135m": dict(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        intermediate=1536,
        norm_eps=1e-5,
        rope_theta=100000.0,
        rope_scaling=None,
        max_seq_len=8192,
        tie_embeddings=True,
        qkv_bias=False,
        mlp_bias=False,
    ),
    # next to no model: what the server itself (HTTP, scheduling, streaming) can carry
    "tiny": dict(
        vocab_size=32000,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        head_dim=16,
        intermediate=128,
        norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_seq_len=4096,
        tie_embeddings=False,
        qkv_bias=False,
        mlp_bias=False,
    ),
}


def numbered_tokenizer(vocab: int):
    """A word-level tokenizer whose tokens are 't0' .. 't{vocab-1}' (for random-weight models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2", pad_token="t0")


def random_llama(args: LlamaArgs, dtype=torch.bfloat16, device="cpu", seed: int = 0) -> Llama:
    """A model of the given shape with random weights (std 0.02), for speed measurements."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Llama(args).to(dtype)
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.data.fill_(1.0)
            else:
                p.data.normal_(0.0, 0.02)
    model.inv_freq = rope_frequencies(args).to(device)
    return model.eval()


def load_llama(folder: str | Path, dtype=torch.float32, device="cpu") -> Llama:
    """Build from ``config.json`` and load ``*.safetensors`` (only safetensors) of a local folder."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    args = LlamaArgs.from_hf(cfg)
    with torch.device("meta"):
        model = Llama(args)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder} (pickled weights are not loaded)")
    state = {}
    for f in files:
        state.update(load_file(f, device="cpu"))
    if args.tie_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if m != "inv_freq"]
    if missing or unexpected:
        raise ValueError(
            f"{folder}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.inv_freq = rope_frequencies(args)
    return model.to(device).eval()
