"""``loraflow bench deep-matrix-completion``: the synthetic experiment of Yaras, Wang, Balzano &
Qu, "Compressible Dynamics in Deep Overparameterized Low-Rank Learning & Adaptation", ICML
2024, arXiv 2406.04112, Sec. 3: a deep factorization of a low-rank matrix from few entries,
trained wide and compressed after its first gradient.

    M* = U Vᵀ: (d, d), rank r*, scaled to ‖M*‖_F = √r* (singular values near 1)
    W = W_L ⋯ W_1,   f(W) = (d² / |Ω|) · ½ ‖P_Ω(W − M*)‖²_F

f is the brief's ½‖P_Ω(W − M*)‖²_F / |Ω| times d², so that its mean over masks is
½‖W − M*‖²_F and one learning rate fits every d (divide ours by d² to convert).

Wide: every W_l is (d, d), orthogonal times epsilon (loraflow's ``DeepLoRA`` init). Compressed
(Sec. 3.2): from the first gradient G = ∇_W f at the wide init, take the top-r singular pairs of
the descent direction −G = U Σ Vᵀ and train the width-r network

    W_1 = eps · V_rᵀ: (r, d),   W_l = eps · I_r: (r, r),   W_L = eps · U_r: (d, r)

(``DeepLoRA.compress_to``) with the outer factors W_1, W_L at gamma · lr and the inner ones at lr
(loraflow's discrepant learning rate). The sign matters for plain gradient descent: built from
G's own pairs, the start W = eps^L U_r V_rᵀ points up the loss, the balanced factors shrink
together and gradient descent stalls at the saddle W = 0 (``tests/bench/test_deep_matrix.py``).
"""

from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loraflow.adapters.deep_lora import DeepLoRA

STEM = "deep-matrix-completion"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class DeepMatrixConfig:
    d: int = 200
    rank: int = 3  # r* of the ground truth
    depth: int = 3
    observed: float = 0.2  # fraction of the d² entries in Ω
    epsilon: float = 1e-3
    lr: float = 0.3  # every wide factor and the compressed inner factors
    gamma: float = 1.0  # the compressed outer factors learn at gamma * lr
    width: int = 6  # r of the compressed network (2 r* by default)
    iterations: int = 6000
    target: float = 1e-2  # relative recovery error to reach
    eval_every: int = 25
    seed: int = 0
    device: str = "auto"  # auto: cuda when there is a GPU, else cpu
    dtype: str = "float32"

    def __post_init__(self):
        for name, least in [("d", 2), ("rank", 1), ("depth", 2), ("width", 1), ("iterations", 1), ("eval_every", 1)]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.rank >= self.d:
            raise ValueError(f"rank must be below d={self.d} (a low-rank ground truth), got {self.rank}")
        if not self.rank <= self.width <= self.d:
            raise ValueError(
                f"width must be between rank={self.rank} and d={self.d} (2 * rank is usual), got {self.width}"
            )
        if not 0 < self.observed <= 1:
            raise ValueError(f"observed must be a fraction in (0, 1] of the entries, got {self.observed!r}")
        if round(self.observed * self.d * self.d) < 1:
            raise ValueError(f"observed={self.observed} keeps no entry of a {self.d} x {self.d} matrix: raise it")
        for name in ("epsilon", "lr", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0 < self.target < 1:
            raise ValueError(f"target must be a relative error in (0, 1), got {self.target!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device != "auto" and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but there is no CUDA GPU here: pass device='cpu' or 'auto'")


@dataclass
class Problem:
    target: torch.Tensor  # M*: (d, d)
    mask: torch.Tensor  # P_Ω as 0/1 entries: (d, d)
    scale: float  # d² / |Ω|


def make_problem(config: DeepMatrixConfig, device: torch.device, dtype: torch.dtype) -> Problem:
    """M* = U Vᵀ with U, V: (d, r*) Gaussian, scaled to ‖M*‖_F = √r*; Ω: a fixed random set of
    round(observed · d²) entries. Drawn on the CPU in float64, so every device sees the same."""
    g = torch.Generator().manual_seed(config.seed)
    d, r = config.d, config.rank
    u, v = torch.randn(d, r, generator=g, dtype=torch.float64), torch.randn(d, r, generator=g, dtype=torch.float64)
    m = u @ v.T  # M*: (d, d)
    m *= math.sqrt(r) / m.norm()
    n_obs = round(config.observed * d * d)
    mask = torch.zeros(d * d, dtype=torch.float64)
    mask[torch.randperm(d * d, generator=g)[:n_obs]] = 1.0
    return Problem(m.to(device, dtype), mask.view(d, d).to(device, dtype), d * d / n_obs)


def end_to_end(factors) -> torch.Tensor:
    """W = W_L ⋯ W_1."""
    w = factors[0]  # (width, d)
    for f in factors[1:]:
        w = f @ w
    return w  # (d, d)


def relative_error(factors, problem: Problem) -> float:
    """‖W − M*‖_F / ‖M*‖_F over ALL entries (recovery, not fit)."""
    return ((end_to_end(factors) - problem.target).norm() / problem.target.norm()).item()


def loss_gradient(w: torch.Tensor, problem: Problem) -> torch.Tensor:
    """E = ∇_W f = (d² / |Ω|) P_Ω(W − M*); at the eps-small init W = O(eps^L), E ≈ −(d²/|Ω|) P_Ω(M*)."""
    return problem.scale * problem.mask * (w - problem.target)  # (d, d)


def gradients(factors, problem: Problem) -> list[torch.Tensor]:
    """∇_{W_l} f = (W_L ⋯ W_{l+1})ᵀ E (W_{l−1} ⋯ W_1)ᵀ with E = ∇_W f (Sec. 3.1)."""
    n = len(factors)
    below = [factors[0]]  # below[i] = W_{i+1} ⋯ W_1 (0-based i): (width, d) ... (d, d)
    for f in factors[1:]:
        below.append(f @ below[-1])
    e = loss_gradient(below[-1], problem)  # E: (d, d)
    above = [None] * n  # above[i] = W_L ⋯ W_{i+2}, the product after factor i
    above[n - 2] = factors[-1]
    for i in range(n - 3, -1, -1):
        above[i] = above[i + 1] @ factors[i + 1]
    grads = []
    for i in range(n):
        g = e if i == n - 1 else above[i].T @ e  # (d, d) or (width, d)
        grads.append(g if i == 0 else g @ below[i - 1].T)  # same shape as factors[i]
    return grads


def compress(wide: DeepLoRA, problem: Problem, width: int) -> tuple[DeepLoRA, torch.Tensor]:
    """The width-r network from the top-r singular pairs of −G, G = ∇_W f at the wide init
    (Sec. 3.2); returns it and σ_1 .. σ_2r of G."""
    u, s, vh = torch.linalg.svd(-loss_gradient(end_to_end(list(wide.factors)), problem))  # −G = U Σ Vᵀ
    small = copy.deepcopy(wide)
    small.compress_to(u[:, :width], vh[:width].T)  # W_1 = eps V_rᵀ, W_l = eps I_r, W_L = eps U_r
    return small, s[: 2 * width]


def train(factors, lrs, problem: Problem, config: DeepMatrixConfig, sync, start_seconds: float = 0.0) -> dict:
    """Full-batch gradient descent W_l ← W_l − η_l ∇_{W_l} f, timed in chunks of ``eval_every``
    steps; the error is measured between chunks, outside the timed span."""
    curve = {"iteration": [0], "seconds": [start_seconds], "error": [relative_error(factors, problem)]}
    elapsed, done = start_seconds, 0
    while done < config.iterations:
        steps = min(config.eval_every, config.iterations - done)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            for w, g, lr in zip(factors, gradients(factors, problem), lrs):
                w.sub_(g, alpha=lr)
        sync()
        elapsed += time.perf_counter() - t0
        done += steps
        err = relative_error(factors, problem)
        curve["iteration"].append(done)
        curve["seconds"].append(elapsed)
        curve["error"].append(err)
        if not math.isfinite(err):  # diverged: lr too large for this problem
            break
    return curve


def _summary(curve: dict, factors, lrs, target: float) -> dict:
    hit = next((i for i, e in enumerate(curve["error"]) if e <= target), None)
    steps, seconds = curve["iteration"][-1], curve["seconds"][-1] - curve["seconds"][0]
    return {
        "shapes": [list(f.shape) for f in factors],
        "parameters": sum(f.numel() for f in factors),
        "lrs": lrs,
        "iterations_to_target": None if hit is None else curve["iteration"][hit],
        "seconds_to_target": None if hit is None else curve["seconds"][hit],
        "ms_per_iteration": 1e3 * seconds / max(steps, 1),
        "final_error": curve["error"][-1],
        "curve": curve,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine() or 'cpu'} CPU, {torch.get_num_threads()} threads"


@torch.no_grad()
def run(config: DeepMatrixConfig) -> dict:
    """Train the wide and the compressed network on one problem; curves, times, speed-up."""
    from loraflow.bench.report import environment

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    )
    dtype = DTYPES[config.dtype]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    problem = make_problem(config, device, dtype)
    with torch.random.fork_rng(devices=[]):  # DeepLoRA draws its orthogonal init on the CPU
        torch.manual_seed(config.seed)
        wide = DeepLoRA(config.d, config.d, config.depth, config.epsilon, dtype=dtype).to(device)
    for _ in range(3):  # warm-up, untimed: kernels, allocator, BLAS threads
        gradients(list(wide.factors), problem)
        compress(wide, problem, config.width)
    sync()
    t0 = time.perf_counter()
    small, singular = compress(wide, problem, config.width)
    sync()
    compress_seconds = time.perf_counter() - t0
    initial_small = relative_error(list(small.factors), problem)
    initial_norm = end_to_end(list(small.factors)).norm().item()

    n = config.depth
    lr, outer = config.lr, config.gamma * config.lr
    wide_lrs, small_lrs = [lr] * n, [outer] + [lr] * (n - 2) + [outer]
    results = {}
    for name, net, lrs, start in [("wide", wide, wide_lrs, 0.0), ("compressed", small, small_lrs, compress_seconds)]:
        factors = list(net.factors)
        curve = train(factors, lrs, problem, config, sync, start_seconds=start)
        results[name] = _summary(curve, factors, lrs, config.target)
    w, c = results["wide"], results["compressed"]
    results["compressed"].update(
        compress_seconds=compress_seconds,
        initial_end_to_end_norm=initial_norm,
        initial_error=initial_small,
        gradient_singular_values=singular.tolist(),
    )
    env = environment()
    env.pop("command", None)  # write_report records the command it is given
    env["device"] = device_name(device)
    reached = w["seconds_to_target"] is not None and c["seconds_to_target"] is not None
    return {
        "config": asdict(config),
        "problem": {
            "observed_entries": int(problem.mask.sum().item()),
            "target_singular_values": torch.linalg.svdvals(problem.target.double())[: config.rank].tolist(),
            "loss": "f = (d^2/|Omega|) * 1/2 ||P_Omega(W - M*)||_F^2",
            "error": "||W - M*||_F / ||M*||_F over all entries",
        },
        "wide": w,
        "compressed": c,
        "speedup_to_target": w["seconds_to_target"] / c["seconds_to_target"] if reached else None,
        "iteration_ratio": w["iterations_to_target"] / c["iterations_to_target"] if reached else None,
        "environment": env,
    }


def markdown_table(result: dict) -> str:
    from loraflow.bench.report import table

    cfg, t = result["config"], result["config"]["target"]
    rows = []
    for name in ("wide", "compressed"):
        r = result[name]
        label = name if name == "wide" else f"compressed (r={cfg['width']}, gamma={cfg['gamma']:g})"
        rows.append(dict(r, variant=label, shapes=", ".join("x".join(map(str, s)) for s in r["shapes"])))
    columns = [
        ("variant", "variant", ""),
        ("shapes", "factors W_1 .. W_L", ""),
        ("parameters", "parameters", "d"),
        ("iterations_to_target", f"iterations to {t:g}", "d"),
        ("seconds_to_target", f"seconds to {t:g}", ".3f"),
        ("ms_per_iteration", "ms / iteration", ".3f"),
        ("final_error", "final error", ".2e"),
    ]
    s = result["speedup_to_target"]
    speed = (
        f"Wall-clock speed-up to error {t:g}: **{s:.1f}x** (iterations ratio {result['iteration_ratio']:.2f})."
        if s is not None
        else f"Speed-up: not measured, a run did not reach error {t:g} in {cfg['iterations']} iterations."
    )
    return table(rows, columns) + "\n\n" + speed + "\n"


def markdown(result: dict, command: str) -> str:
    cfg, env, c = result["config"], result["environment"], result["compressed"]
    return (
        "# Deep matrix completion: wide vs compressed deep factorization\n\n"
        "Yaras, Wang, Balzano & Qu, ICML 2024 (arXiv 2406.04112), Sec. 3. "
        f"M* of size {cfg['d']} x {cfg['d']}, rank {cfg['rank']}, {100 * cfg['observed']:g}% of the entries observed; "
        f"depth {cfg['depth']}, orthogonal init times {cfg['epsilon']:g}; full-batch gradient descent, "
        f"lr {cfg['lr']:g}, compressed outer factors at gamma * lr = {cfg['gamma'] * cfg['lr']:g}; "
        f"loss {result['problem']['loss']}; error {result['problem']['error']}.\n\n"
        + markdown_table(result)
        + f"\nSeconds are training only: the error evaluation between chunks of {cfg['eval_every']} iterations is "
        f"not timed; the compressed run's seconds include its first gradient and SVD "
        f"({1e3 * c['compress_seconds']:.1f} ms).\n\n"
        f"- device: {env['device']} ({cfg['dtype']})\n- torch: {env['torch']}\n- date: {env['date']}\n"
        f"- command: `{command}`\n"
    )


def figure(result: dict):
    from loraflow.bench.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in [("wide", "-"), ("compressed", "--")]:
        curve = result[name]["curve"]
        for ax, x in zip(axes, ("iteration", "seconds")):
            ax.semilogy(curve[x], curve["error"], style, label=name)
    for ax, label in zip(axes, ("iteration", "seconds (training only)")):
        ax.axhline(result["config"]["target"], color="gray", linestyle=":", linewidth=1, label="target")
        ax.set_xlabel(label)
        ax.set_ylabel("||W - M*||_F / ||M*||_F")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    cfg = result["config"]
    fig.suptitle(
        f"deep matrix completion: d={cfg['d']}, rank {cfg['rank']}, {100 * cfg['observed']:g}% observed, "
        f"depth {cfg['depth']}, {result['environment']['device']}"
    )
    return fig


def write_report(result: dict, out_dir, command: str) -> list[Path]:
    """Write deep-matrix-completion.json, .md and .png under ``out_dir``."""
    from loraflow.bench import report

    payload = dict(result, environment=dict(result["environment"], command=command))
    fig = figure(result)
    try:
        return report.write(out_dir, STEM, payload, markdown(result, command), fig)
    finally:
        fig.clf()
        report.pyplot().close(fig)


QUICK = {"d": 50, "epsilon": 1e-2, "iterations": 1500}  # a smoke run: seconds on a CPU


def add_arguments(parser) -> None:
    """The options of ``loraflow bench deep-matrix-completion``; defaults are DeepMatrixConfig's."""
    default = DeepMatrixConfig()
    helps = {
        "d": "size of the d x d ground truth",
        "rank": "rank r* of the ground truth",
        "depth": "number of factors L",
        "observed": "fraction of the entries observed",
        "epsilon": "init scale: every factor starts orthogonal times epsilon",
        "lr": "gradient-descent learning rate (wide factors, compressed inner factors)",
        "gamma": "the compressed outer factors W_1, W_L learn at gamma * lr",
        "width": "width r of the compressed network (2 * rank is usual)",
        "iterations": "gradient-descent steps per run",
        "target": "relative recovery error at which times are compared",
        "eval_every": "iterations between two error measurements (untimed)",
        "seed": "seed of the ground truth, mask and init",
    }
    for name, text in helps.items():
        value = getattr(default, name)
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=value, help=f"{text} (default {value})")
    parser.add_argument("--device", default=default.device, help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--dtype", default=default.dtype, choices=sorted(DTYPES), help="default float32")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + " over the other options",
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, Markdown and PNG")


def config_from_args(args) -> DeepMatrixConfig:
    fields = {k: getattr(args, k) for k in DeepMatrixConfig.__dataclass_fields__}
    return DeepMatrixConfig(**(fields | (QUICK if args.quick else {})))


def cmd(args) -> None:
    """Wide vs compressed deep matrix completion (Deep LoRA paper, Sec. 3); write JSON, Markdown and PNG."""
    from loraflow.bench.report import environment

    result = run(config_from_args(args))
    paths = write_report(result, args.out, environment()["command"])
    print(markdown_table(result))
    print("wrote", ", ".join(map(str, paths)))
