"""``loraflow bench deep-matrix-completion`` on a small problem: both networks recover M*, the
compressed one from a width-r start of size eps^L, and the report files hold the numbers."""

import argparse
import json
import math

import pytest
import torch

from loraflow.adapters.deep_lora import DeepLoRA
from loraflow.bench import deep_matrix as dm

SMALL = dict(
    d=40, rank=2, width=4, observed=0.3, epsilon=1e-2, iterations=1500, eval_every=50, device="cpu", dtype="float64"
)


@pytest.fixture(scope="module")
def result():
    return dm.run(dm.DeepMatrixConfig(**SMALL))


def test_both_networks_recover_the_low_rank_matrix(result):
    for name in ("wide", "compressed"):
        curve = result[name]["curve"]
        assert curve["error"][0] == pytest.approx(1.0, abs=1e-3)  # W = O(eps^3) at init
        assert curve["error"][-1] < 1e-3, name  # all entries, 70% of them never seen
        assert result[name]["iterations_to_target"] is not None
        assert curve["seconds"] == sorted(curve["seconds"])
    assert result["wide"]["shapes"] == [[40, 40]] * 3
    assert result["compressed"]["shapes"] == [[4, 40], [4, 4], [40, 4]]  # width r = 4
    assert result["compressed"]["parameters"] == 4 * 40 * 2 + 16
    assert result["speedup_to_target"] > 0


def test_compressed_start_is_eps_to_the_depth(result):
    c = result["compressed"]
    # W = eps^3 U_r V_rᵀ with orthonormal U_r, V_r: ‖W‖_F = eps^3 √r
    assert c["initial_end_to_end_norm"] == pytest.approx(1e-6 * math.sqrt(4), rel=1e-6)
    assert c["initial_error"] == pytest.approx(1.0, abs=1e-5)
    assert c["curve"]["seconds"][0] == pytest.approx(c["compress_seconds"])  # its SVD is paid for
    s = c["gradient_singular_values"]
    assert len(s) == 8 and s == sorted(s, reverse=True)  # σ_1 .. σ_2r of G
    assert s[1] > 1.25 * s[2]  # G ≈ −(d²/|Ω|) P_Ω(M*): the rank-2 signal stands above the mask's noise


def test_gradients_match_autograd():
    cfg = dm.DeepMatrixConfig(d=12, rank=2, width=4, depth=4, dtype="float64", device="cpu")
    problem = dm.make_problem(cfg, torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 12), (4, 4), (4, 4), (12, 4)]
    factors = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    w = dm.end_to_end(factors)
    loss = problem.scale * 0.5 * (problem.mask * (w - problem.target)).pow(2).sum()
    loss.backward()
    for f, mine in zip(factors, dm.gradients([f.detach() for f in factors], problem)):
        torch.testing.assert_close(mine, f.grad, rtol=1e-10, atol=1e-10)


def test_problem_observes_the_asked_fraction():
    cfg = dm.DeepMatrixConfig(**SMALL)
    problem = dm.make_problem(cfg, torch.device("cpu"), torch.float64)
    assert problem.mask.sum().item() == round(0.3 * 40 * 40)
    assert problem.scale == pytest.approx(1600 / 480)
    assert problem.target.norm().item() == pytest.approx(math.sqrt(2))
    assert torch.linalg.matrix_rank(problem.target).item() == 2


@torch.no_grad()
def test_start_built_up_the_gradient_stalls():
    """From G's own singular pairs (not −G's) the balanced factors shrink together: gradient
    descent stays at the saddle W = 0, where the −G start recovers M*."""
    cfg = dm.DeepMatrixConfig(**SMALL | dict(iterations=600))
    problem = dm.make_problem(cfg, torch.device("cpu"), torch.float64)
    torch.manual_seed(0)
    wide = DeepLoRA(40, 40, 3, 1e-2, dtype=torch.float64)
    errors = {}
    for sign in (1.0, -1.0):
        small, _ = dm.compress(wide, problem, 4)
        factors = [f.detach().clone() for f in small.factors]
        factors[-1] *= sign  # -1: W_L = eps · (−U_r), the pair of G itself
        errors[sign] = dm.train(factors, [cfg.lr] * 3, problem, cfg, lambda: None)["error"][-1]
    assert errors[1.0] < 1e-2 and errors[-1.0] > 0.99


def test_report_files_round_trip(result, tmp_path):
    paths = dm.write_report(result, tmp_path, "loraflow bench deep-matrix-completion --d 40")
    assert [p.name for p in paths] == [f"deep-matrix-completion.{e}" for e in ("json", "md", "png")]
    back = json.loads(paths[0].read_text())
    assert back["wide"]["curve"]["error"] == result["wide"]["curve"]["error"]
    assert back["speedup_to_target"] == result["speedup_to_target"]
    assert back["environment"]["command"] == "loraflow bench deep-matrix-completion --d 40"
    assert back["config"] == dm.DeepMatrixConfig(**back["config"]).__dict__
    md = paths[1].read_text()
    assert "| wide | 40x40, 40x40, 40x40 | 4800 |" in md
    assert f"**{result['speedup_to_target']:.1f}x**" in md and "- command: `loraflow bench" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_options_build_the_config():
    parser = argparse.ArgumentParser()
    dm.add_arguments(parser)
    args = parser.parse_args(["--d", "40", "--rank", "2", "--gamma", "0.5", "--dtype", "float64", "--quick"])
    cfg = dm.config_from_args(args)
    assert (cfg.rank, cfg.gamma, cfg.dtype, cfg.width) == (2, 0.5, "float64", 6)
    assert (cfg.d, cfg.iterations) == (dm.QUICK["d"], dm.QUICK["iterations"])  # --quick wins
    assert parser.parse_args([]).out == "benchmarks/results"
    assert dm.config_from_args(parser.parse_args([])) == dm.DeepMatrixConfig()


@pytest.mark.parametrize(
    "field, value",
    [
        ("depth", 1),
        ("observed", 0.0),
        ("observed", 1.5),
        ("width", 2),  # below rank=3
        ("rank", 200),
        ("epsilon", 0.0),
        ("lr", float("nan")),
        ("target", 1.0),
        ("dtype", "bfloat16"),
        ("iterations", 0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        dm.DeepMatrixConfig(**{field: value})
