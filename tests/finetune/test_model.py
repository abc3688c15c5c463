"""The fine-tuning losses through the chunked head equal those of the model's own logits."""

import torch
import torch.nn.functional as F

import loraflow as lf
from loraflow.finetune.model import plain_head, token_losses


def test_token_losses_through_the_chunked_head_equal_the_models_logits(tiny_smol):
    model, _ = lf.load_model(tiny_smol)
    lf.add_adapter(model, lf.LoRAConfig(r=4, target_modules="all-linear"), name="a")
    assert plain_head(model) is model.lm_head
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    got = token_losses(model, batch)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    want = F.cross_entropy(logits.transpose(1, 2).float(), labels[:, 1:], reduction="none").sum(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    params = lf.adapter_parameters(model, "a")
    ours = torch.autograd.grad(got.sum(), params)
    theirs = torch.autograd.grad(want.sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
