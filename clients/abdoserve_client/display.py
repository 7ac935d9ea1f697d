"""Human-readable and JSON renderings of a result, for the `abdoserve infer` CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from abdoserve_client.results import ClassificationResult, ScoreResult, StudyResult, TaskInfo


def as_json(result: StudyResult) -> str:
    """The server's ANSWER JSON plus the full-precision study and per-image values."""
    document: dict[str, Any] = {
        "answer": result.answer,
        "study_values": result.study_values.tolist(),
        "image_values": result.image_values.tolist(),
    }
    return json.dumps(document, indent=2)


def as_text(result: StudyResult, info: TaskInfo, names: Sequence[str]) -> str:
    """Title, notice, answer, per-image values and provenance; `names[i]` names instance i."""
    lines = [f"{info.title} ({result.task})"]
    if info.paper:
        lines.append(info.paper)
    if result.notice:
        lines.extend(_banner(result.notice))
    lines.append("")
    lines.extend(_answer_lines(result, info))
    lines.append("")
    lines.extend(_image_lines(result, names))
    lines.append("")
    lines.append(_model_line(result))
    return "\n".join(lines)


def _banner(notice: str) -> list[str]:
    rule = "!" * (len(notice) + 2)
    return ["", rule, f"! {notice}", rule]


def _answer_lines(result: StudyResult, info: TaskInfo) -> list[str]:
    if isinstance(result, ClassificationResult):
        lines = [f"Answer: {result.label} ({result.description})"]
        lines.extend(
            f"  {label:<4} {probability:.4f}  {info.describe(label)}"
            for label, probability in result.probabilities.items()
        )
        return lines
    if isinstance(result, ScoreResult):
        unit = f" {result.unit}" if result.unit else ""
        lines = [f"Answer: {result.name} = {result.value:.4f}{unit}"]
        if result.stage:
            lines.append(f"  stage {result.stage} ({result.stage_description})")
        lines.extend(
            f"  {flag}: {'YES' if value else 'no'}" for flag, value in result.flags.items()
        )
        return lines
    return [f"Answer: {json.dumps(result.answer.get('result'))}"]


def _image_lines(result: StudyResult, names: Sequence[str]) -> list[str]:
    count = len(result.images)
    lines = [f"Per image ({count} sample{'' if count == 1 else 's'}; [instance] file: values):"]
    for image in result.images:
        name = names[image.instance] if 0 <= image.instance < len(names) else "?"
        values = "  ".join(
            f"{label} {value:.4f}" if len(image.values) > 1 else f"{value:.4f}"
            for label, value in zip(result.labels, image.values, strict=False)
        )
        lines.append(f"  [{image.instance}] {name}: {values}")
    return lines


def _model_line(result: StudyResult) -> str:
    model = result.model
    state = "UNTRAINED reference weights" if model.untrained else "trained weights"
    digest = f", sha256 {model.weights_sha256[:16]}" if model.weights_sha256 else ""
    return (
        f"Model: {model.name} version {model.version}; "
        f"weights {model.weights_source}{digest} ({state})"
    )
