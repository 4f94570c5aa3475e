"""Signal-token trigger rate: asked for modality X, did the model emit X's group, and only it.

For a captioning request ("describe this image") the expected answer is text, so a sample
triggers correctly when the model emitted no signal group at all. Needs no extra weights.
"""

from __future__ import annotations

from collections.abc import Sequence


def trigger_rates(groups: Sequence[Sequence[str]], expected: str | None) -> dict[str, float | int | str]:
    """``groups[i]`` lists the modality of each signal group sample i emitted, in order."""
    n = len(groups)
    if n == 0:
        return {"samples": 0}
    if expected is None:
        correct = [len(g) == 0 for g in groups]
        emitted = [0] * n
    else:
        correct = [len(g) > 0 and set(g) == {expected} for g in groups]
        emitted = [expected in g for g in groups]
    other = [any(m != expected for m in g) for g in groups]
    return {
        "expected": expected or "text",
        "samples": n,
        "trigger_rate": sum(correct) / n,  # exactly the asked modality (text: no group)
        "emitted_rate": sum(emitted) / n,  # the asked modality among others
        "other_modality_rate": sum(other) / n,  # a group of a modality not asked for
        "no_signal_rate": sum(len(g) == 0 for g in groups) / n,
        "multiple_groups_rate": sum(len(g) > 1 for g in groups) / n,
    }
