"""Per-prompt gradient snapshots (`zopro.subspace_gradients = "prompts"`, accumulation.backward_for_update):
each prompt's gradient against a backward of that prompt's answers alone, the batch's gradient unchanged,
and a real run whose subspace basis is built from them."""

from __future__ import annotations

import pytest
import torch

from engine.recipe import RecipeError, load_recipe
from engine.training.accumulation import backward_for_update, backward_in_chunks
from engine.training.distributed import Distributed
from engine.training.objectives import clipped_surrogate
from engine.training.rollout import token_logprobs
from engine.training.telemetry import Counters
from tests.nano import nano_rollout
from tests.runs import finished_run, read_events
from tests.test_methods_e2e import SUBSPACE_RECIPE

K = 3  # answers per prompt


@pytest.fixture(scope="module")
def pm(moved_nano):
    return moved_nano


@pytest.fixture(scope="module")
def rollout(pm):
    return nano_rollout(pm, 4, K)


def loss_of(rollout):
    rows = len(rollout.advantages)

    def chunk_loss(part: slice, new_logprobs: torch.Tensor):
        loss, stats = clipped_surrogate(
            new_logprobs, rollout.old_logprobs[part], rollout.advantages[part], 0.2
        )
        share = (part.stop - part.start) / rows
        return loss * share, {key: value * share for key, value in stats.items()}

    return chunk_loss


def gradients(params) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return out


def test_each_prompt_gradient_is_its_answers_alone_and_they_add_up_to_the_batch(pm, rollout):
    params = pm.adapter_parameters("policy")
    chunk_loss = loss_of(rollout)
    seen: list[dict[str, torch.Tensor]] = []
    with pm.adapter("policy"):
        loss, _ = backward_for_update(
            pm, rollout.sequences, Counters(), chunk_loss, dist=Distributed(), named_params=params,
            weight=len(rollout.advantages), on_gradient=seen.append, per_prompt=K,
        )  # fmt: skip
        batch_of_prompts = gradients(params)
        by_hand = []
        for start in range(0, len(rollout.advantages), K):  # each prompt's answers alone, by hand
            part = slice(start, start + K)
            logprobs = token_logprobs(pm, rollout.sequences.select(torch.arange(start, start + K)), None)
            chunk_loss(part, logprobs)[0].backward()
            by_hand.append(gradients(params))
        counters = Counters()
        whole, _ = backward_in_chunks(pm, rollout.sequences, counters, chunk_loss)
        batch = gradients(params)
    assert len(seen) == len(by_hand) == 4  # one snapshot a prompt
    assert counters.forward_passes == 1 and counters.backward_passes == 1  # counted as the batch's
    assert loss == pytest.approx(whole, abs=1e-6)  # near 0 at ratio 1: advantages add up to 0
    for name in params:
        scale = float(batch[name].abs().max()) + 1e-12
        for mine, theirs in zip(seen, by_hand, strict=True):
            assert float((mine[name] - theirs[name]).abs().max()) <= 1e-5 * scale
        assert float((sum(g[name] for g in seen) - batch[name]).abs().max()) <= 1e-5 * scale
        assert float((batch_of_prompts[name] - batch[name]).abs().max()) <= 1e-5 * scale
    # the prompts differ (a broken difference would hand every call the running total)
    name = max(params, key=lambda n: float(batch[n].abs().max()))
    assert float((seen[1][name] - seen[0][name]).abs().max()) > 1e-3 * float(batch[name].abs().max())


def test_the_batch_gradient_is_snapshot_once_by_default(pm, rollout):
    params = pm.adapter_parameters("policy")
    seen: list[dict[str, torch.Tensor]] = []
    with pm.adapter("policy"):
        backward_for_update(
            pm, rollout.sequences, Counters(), loss_of(rollout), dist=Distributed(), named_params=params,
            weight=len(rollout.advantages), on_gradient=lambda g: seen.append(dict(g)),
        )  # fmt: skip
        batch = gradients(params)
    assert len(seen) == 1 and all(torch.equal(seen[0][n], batch[n]) for n in params)


PROMPTS_RECIPE = SUBSPACE_RECIPE.replace(
    'sampler = "subspace"', 'sampler = "subspace"\nsubspace_gradients = "prompts"\nsubspace_snapshots = 64'
)


def test_a_run_builds_its_subspace_from_each_prompts_gradient(tmp_path):
    _, run = finished_run(tmp_path, "prompts", PROMPTS_RECIPE)
    events = read_events(run)
    recipe = events[0]["recipe"]
    prompts = recipe["train"]["prompts_per_update"]
    policy = [e for e in events if e["type"] == "metrics" and e["stage"] == "policy"]
    first = [e["metrics"] for e in policy if e["iteration"] == 0]
    assert prompts > 1
    assert [m["zo/basis_snapshots"] for m in first] == [prompts * (i + 1) for i in range(len(first))]
    second = [e["metrics"] for e in policy if e["metrics"].get("zo/first_order") == 0.0]
    # more directions than the batch gradients' (one an update) could span
    assert second and all(len(first) < m["zo/basis_rank"] <= prompts * len(first) for m in second)
    assert all(m["zo/step_norm"] > 0 and m["zo/skipped"] == 0.0 for m in second)


def test_a_recipe_keeps_room_for_every_prompt_gradient(tmp_path):
    path = tmp_path / "r.toml"
    text = (
        '[policy]\nmethod = "zopro"\n[train]\nprompts_per_update = 8\nupdates_per_iteration = 15\n'
        '[zopro]\nsampler = "subspace"\nsubspace_gradients = "prompts"\n'
    )
    path.write_text(text)
    with pytest.raises(
        RecipeError, match=r"= 120 gradients.*subspace_snapshots = 16 keeps only.*set it to 120"
    ):
        load_recipe(path)
    path.write_text(text + "subspace_snapshots = 120\n")
    assert load_recipe(path).zopro.subspace_gradients == "prompts"
