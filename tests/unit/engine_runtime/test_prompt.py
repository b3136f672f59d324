"""Prompt version choice and rendering."""

from __future__ import annotations

from collections import Counter

import pytest

from engine.errors import PromptError
from engine.prompt import PromptSet, bucket_of, render_template, version_key
from specmesh.snapshot import PromptBundle
from specmesh.spec.models import AgentBase, PromptEntry, PromptRelease


def _bundle(*versions: str, release: PromptRelease | None = None) -> PromptBundle:
    return PromptBundle(
        versions={
            v: PromptEntry(
                prompt_key="p", version=v, template=f"v{v} {{{{who}}}}", variables={"who": "x"}
            )
            for v in versions
        },
        release=release,
    )


def _base(**kw: object) -> AgentBase:
    return AgentBase.model_validate({"description": "d", "promptKey": "p", **kw})


def test_versions_sort_numerically() -> None:
    ordered = sorted(["3.0.9", "3.0.11", "3.0", "10.0", "3.0.11-rc1"], key=version_key)

    assert ordered == ["3.0", "3.0.9", "3.0.11", "3.0.11-rc1", "10.0"]


def test_render_fills_known_placeholders_and_keeps_unknown_ones() -> None:
    assert render_template("Hi {{ name }}, {{other}}", {"name": "Ann"}) == "Hi Ann, {{other}}"


def test_spec_variables_override_prompt_defaults() -> None:
    prompts = PromptSet.build(_base(variables={"who": "spec"}), _bundle("1"))

    assert prompts.choose("c").text == "v1 spec"


def test_without_release_the_highest_version_serves() -> None:
    prompts = PromptSet.build(_base(), _bundle("3.0.9", "3.0.11", "3.0"))

    assert prompts.choose("any").version == "3.0.11"


def test_current_version_serves_over_the_highest_but_not_over_weights() -> None:
    rolled_back = PromptSet.build(_base(), _bundle("1", "2", release=PromptRelease(current="1")))
    split = PromptSet.build(
        _base(), _bundle("1", "2", release=PromptRelease(current="1", weights={"2": 100}))
    )

    assert {rolled_back.choose(f"c{i}").version for i in range(50)} == {"1"}
    assert {split.choose(f"c{i}").version for i in range(50)} == {"2"}


def test_pinned_version_wins_over_label_and_weights() -> None:
    release = PromptRelease(labels={"prod": "1"}, weights={"1": 50, "2": 50})
    prompts = PromptSet.build(_base(promptVersion="2"), _bundle("1", "2", "3", release=release))

    assert {prompts.choose(f"c{i}").version for i in range(50)} == {"2"}


def test_label_picks_its_version() -> None:
    release = PromptRelease(labels={"prod": "1"}, weights={"1": 50, "2": 50})
    prompts = PromptSet.build(_base(promptLabel="prod"), _bundle("1", "2", release=release))

    assert {prompts.choose(f"c{i}").version for i in range(50)} == {"1"}


def test_ab_weights_are_stable_per_conversation_and_follow_the_split() -> None:
    release = PromptRelease(weights={"1": 20, "2": 80})
    prompts = PromptSet.build(_base(), _bundle("1", "2", release=release))

    choices = {f"ctx-{i}": prompts.choose(f"ctx-{i}").version for i in range(2000)}
    again = {cid: prompts.choose(cid).version for cid in choices}
    counts = Counter(choices.values())

    assert again == choices
    assert 300 < counts["1"] < 500 and 1500 < counts["2"] < 1700


def test_bucket_is_deterministic() -> None:
    assert bucket_of("conversation-42") == bucket_of("conversation-42")
    assert 0 <= bucket_of("x") < 100


@pytest.mark.parametrize(
    ("base", "bundle", "reason"),
    [
        ({}, PromptBundle(), "no version"),
        ({"promptVersion": "9"}, _bundle("1"), "pinned version '9' not found"),
        ({"promptLabel": "prod"}, _bundle("1"), "no version has label 'prod'"),
        (
            {},
            _bundle("1", release=PromptRelease(weights={"1": 50, "7": 50})),
            "missing versions ['7']",
        ),
    ],
)
def test_unusable_prompts_are_refused(
    base: dict[str, object], bundle: PromptBundle, reason: str
) -> None:
    with pytest.raises(PromptError) as info:
        PromptSet.build(_base(**base), bundle)

    assert reason in str(info.value)
