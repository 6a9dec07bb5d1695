"""Recipe keys of the zeroth-order samplers and evaluation, and [compare] entries that carry settings."""

from __future__ import annotations

import pytest

from engine.cli.app import compare_methods_of
from engine.recipe import (
    RecipeError,
    load_recipe,
    recipe_from_dict,
    split_method_list,
    split_variant,
    variant_label,
)
from tests.conftest import REPO, zopro


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"policy": {"method": "mezo"}, "mezo": {"sampler": "zopro"}}, ["mezo.sampler", "isotropic, block"]),
        (
            {"policy": {"method": "zopro"}, "zopro": {"sampler": "subspace", "first_iteration": "mezo"}},
            ["zopro.sampler = 'subspace'", "first_iteration = 'rloo'"],
        ),
        (
            {"policy": {"method": "zopro"}, "zopro": {"z_norm": "mu"}},
            ["zopro.z_norm", "published, reference"],
        ),
        ({"policy": {"method": "zopro"}, "zopro": {"subspace_snapshots": 0}}, ["zopro.subspace_snapshots"]),
        ({"eval": {"samples_per_prompt": 0}}, ["eval.samples_per_prompt", ">= 1"]),
        ({"compare": {"methods": ["rloo", "zopro:sampler=subspac"]}}, ["zopro:sampler=subspac", "subspace"]),
        ({"compare": {"methods": ["rloo", "zopro:lrr=0.1"]}}, ["zopro.lrr", "did you mean 'lr'"]),
        ({"compare": {"methods": ["rloo", "zoprox:lr=0.1"]}}, ["[compare]", "zopro:sampler=subspace"]),
    ],
)
def test_bad_zeroth_order_settings_are_one_sentence(raw, fragments):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(raw, "r.toml")
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_compare_entries_with_settings():
    assert split_variant("zopro:sampler=subspace, lr=0.2") == (
        "zopro",
        ["zopro.sampler=subspace", "zopro.lr=0.2"],
    )
    assert split_variant("rloo") == ("rloo", [])
    assert split_method_list("rloo,zopro:sampler=subspace,lr=0.2,mezo:sampler=block") == [
        "rloo",
        "zopro:sampler=subspace,lr=0.2",
        "mezo:sampler=block",
    ]
    assert variant_label("zopro:sampler=subspace,lr=0.2") == "zopro-sampler-subspace-lr-0.2"
    raw = {"zopro": {"lr": 0.5}, "compare": {"methods": ["rloo", "zopro:sampler=block"]}}
    recipe_from_dict(raw, "r.toml")
    assert raw["zopro"] == {"lr": 0.5}  # validating the variants leaves the recipe as it was


def test_shipped_compare_recipe_lists_the_paper_sampler_and_the_subspace_one():
    path = REPO / "recipes" / "tiny-compare.toml"
    result = zopro("validate", str(path))
    assert result.returncode == 0, result.stderr
    entries = compare_methods_of(path)  # what `zopro run` reads from [compare]
    resolved = {}  # each entry's recipe as `zopro run` builds it: policy.method, then the entry's settings
    for entry in entries:
        method, own = split_variant(entry)
        resolved[entry] = load_recipe(path, [f"policy.method={method}", *own])
    zeroth = [(r.zopro.sampler, r.zopro.z_norm) for r in resolved.values() if r.policy.method == "zopro"]
    assert sorted(zeroth) == [("subspace", "reference"), ("zopro", "published")], zeroth
    assert {r.policy.method for r in resolved.values()} == {"rloo", "mezo", "zopro"}
    assert len({r.seed for r in resolved.values()}) == 1  # the same seed and data for every entry


def test_bench_refuses_a_bad_variant_in_one_sentence():
    result = zopro("bench", "methods", "--methods", "rloo,zopro:sampler=nope")
    assert result.returncode == 2
    assert "zopro.sampler" in result.stderr and "Traceback" not in result.stderr
