"""The batched sampler: a batch's rows drawn together equal each row drawn alone for the same
seeds, respect top-k and top-p, follow softmax(l / T); and seeded requests sampled in one
engine batch equal the same requests run one by one."""

import torch
from helpers import prompt, tiny_llama_folder

import loraflow as lf
from loraflow.serve.sampling import SamplingParams, sample, sample_rows


def params_and_seeds():
    ps = [
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.0, top_k=3, seed=2),
        SamplingParams(temperature=1.3, top_p=0.5, seed=3),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.8, seed=4),
        SamplingParams(temperature=2.0, seed=5),
    ]
    return ps, [p.seed for p in ps]


def test_rows_drawn_together_equal_each_row_alone():
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    ps, seeds = params_and_seeds()
    for _ in range(20):  # the generators advance together in both
        gens_a = [torch.Generator().manual_seed(s) for s in seeds]
        gens_b = [torch.Generator().manual_seed(s) for s in seeds]
        together = sample_rows(logits, ps, gens_a).tolist()
        alone = [sample(logits[i], ps[i], gens_b[i])[0] for i in range(5)]
        assert together == alone
        seeds = [s + 100 for s in seeds]


def test_top_k_top_p_and_the_distribution():
    torch.manual_seed(1)
    logits = torch.randn(1, 8) * 2
    order = logits[0].argsort(descending=True).tolist()
    g = torch.Generator().manual_seed(0)
    draws = lambda p, n: torch.cat([sample_rows(logits, [p], [g]) for _ in range(n)])  # noqa: E731
    assert set(draws(SamplingParams(temperature=1.0, top_k=2), 400).tolist()) <= set(order[:2])
    assert set(draws(SamplingParams(temperature=1.0, top_p=1e-6), 50).tolist()) == {order[0]}
    freq = torch.bincount(draws(SamplingParams(temperature=0.8), 20000), minlength=8).float() / 20000
    assert (freq - torch.softmax(logits[0] / 0.8, -1)).abs().max() < 0.015


def test_seeded_requests_sampled_together_equal_one_by_one(tmp_path):
    tiny_llama_folder(tmp_path / "base")
    eng = lf.Engine(model=tmp_path / "base", device="cpu", max_batch_tokens=256)
    ps, _ = params_and_seeds()
    prompts = [prompt(i, 5) for i in range(len(ps))]
    together = [eng.add_request(p, SamplingParams(**{**vars(q), "max_tokens": 8, "ignore_eos": True}))
                for p, q in zip(prompts, ps)]  # fmt: skip
    while not all(r.finished for r in together):
        eng.step()
    for r, p, q in zip(together, prompts, ps):
        alone = eng.add_request(p, SamplingParams(**{**vars(q), "max_tokens": 8, "ignore_eos": True}))
        while not alone.finished:
            eng.step()
        assert alone.output_ids == r.output_ids
    assert len({tuple(r.output_ids) for r in together}) > 1
