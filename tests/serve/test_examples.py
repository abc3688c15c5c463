"""The example adapters that `make serve` serves: they load, and each changes the default model."""

from pathlib import Path

import loraflow as lf

EXAMPLES = Path(__file__).parents[2] / "examples" / "adapters"


def test_example_adapters_change_and_end_the_answers():
    eng = lf.Engine(adapter_dir=EXAMPLES, device="cpu", max_batch_tokens=256)
    assert sorted(eng.registry.paths) == ["medical", "python", "shakespeare"]
    tok = eng.tokenizer
    ask = tok.apply_chat_template(
        [{"role": "user", "content": "Write a function to add two numbers."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    params = lf.serve.sampling.SamplingParams(max_tokens=60, temperature=0.0)
    reqs = {
        name: eng.add_request(ask if name != "shakespeare" else "ROMEO:\n", params, name)
        for name in ["python", "medical", "shakespeare", None]
    }
    base_poem = eng.add_request("ROMEO:\n", params, None)
    while eng.has_work():
        eng.step()
    assert reqs["python"].text != reqs[None].text and "def " in reqs["python"].text
    assert reqs["python"].finish_reason == "stop"  # it learned to end its turn
    assert reqs["shakespeare"].text != base_poem.text
    assert all(r.finish_reason in ("stop", "length") and r.text for r in reqs.values())
