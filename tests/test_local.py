"""The local optimiser and the platform's independence from Ray."""

from __future__ import annotations

import torch

from hfedmoe.platform.client import ExpertAdamW


def test_expert_adamw_equals_torch_adamw_on_a_fixed_set():
    torch.manual_seed(0)
    ours = {"a": torch.randn(5, 3), "b": torch.randn(4)}
    theirs = {k: v.clone().requires_grad_(True) for k, v in ours.items()}
    for t in ours.values():
        t.requires_grad_(True)
    reference = torch.optim.AdamW(theirs.values(), lr=1e-2, weight_decay=0.1)
    optimiser = ExpertAdamW(lr=1e-2, weight_decay=0.1)
    for step in range(5):
        grads = {k: torch.randn_like(v) * (step + 1) for k, v in ours.items()}
        for k in ours:
            ours[k].grad, theirs[k].grad = grads[k].clone(), grads[k].clone()
        optimiser.step(ours)
        reference.step()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-7)


def test_expert_adamw_drops_the_moments_of_experts_leaving_the_step():
    expert = torch.zeros(3, requires_grad=True)
    shared = torch.zeros(2, requires_grad=True)
    optimiser = ExpertAdamW(lr=0.1, weight_decay=0.0)
    expert.grad, shared.grad = torch.ones(3), torch.ones(2)
    optimiser.step({"expert/0/0/w": expert, "shared/s": shared})
    assert set(optimiser.state) == {"expert/0/0/w", "shared/s"}
    before = expert.detach().clone()
    shared.grad = torch.ones(2)
    optimiser.step({"shared/s": shared})  # the expert is frozen this step
    assert set(optimiser.state) == {"shared/s"}  # its moments are gone with it
    torch.testing.assert_close(expert.detach(), before)  # and it did not move
    # Selected again, it starts from fresh moments: Adam's first step is -lr * sign(g).
    expert.grad = torch.full((3,), -5.0)
    optimiser.step({"expert/0/0/w": expert})
    torch.testing.assert_close(expert.detach(), before + 0.1, rtol=0, atol=1e-6)
