"""Prompt templates and the closed attribute vocabularies of the synthetic world, for zero-shot use.

A zero-shot class is described by one or more phrases that complete "a person ..." ("with long red
hair", "wearing glasses", or "" for the plain person); `class_prompts` puts each into every template,
and the class embedding is the normalised mean of the prompt embeddings (CLIP's prompt ensembling).
The templates follow the phrasings of the synthetic captions (`data.synthetic.make_captions`), the
only language the project's small model has seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a person {}",
    "portrait of a person {}",
    "close-up of a person {}",
    "headshot of a person {}",
)


def class_prompts(phrases: str | Sequence[str], templates: tuple[str, ...] = PROMPT_TEMPLATES) -> list[str]:
    """Every template filled with every phrase ("with red hair"); "" gives "a photo of a person"."""
    phrases = [phrases] if isinstance(phrases, str) else list(phrases)
    return [" ".join(t.format(p).split()) for p in phrases for t in templates]


@dataclass(frozen=True)
class ZeroShotAttribute:
    """A closed-vocabulary attribute of ``attributes.json``: its values, phrases per value, and which
    images it applies to (hair colour is undefined on a bald head)."""

    name: str
    phrases: dict[Any, tuple[str, ...]]  # attribute value -> phrases completing "a person ..."
    applies: Callable[[dict], bool] = field(default=lambda attributes: True)

    @property
    def values(self) -> list:
        return list(self.phrases)


def synthetic_attributes() -> list[ZeroShotAttribute]:
    """The appearance attributes of the synthetic world with their full vocabularies."""
    from ..data.synthetic import EYE_COLORS, FRAME_COLORS, HAIR_COLORS, HAIR_LENGTHS, LIP_COLORS, SKIN_TONES

    lengths = [n for n in HAIR_LENGTHS if n != "bald"]
    return [
        # Captions name hair as "<length> <colour> hair": ensemble over the lengths.
        ZeroShotAttribute("hair_color", {c: tuple(f"with {n} {c} hair" for n in lengths) for c in HAIR_COLORS},
                          lambda a: a["hair_length"] != "bald"),
        ZeroShotAttribute("hair_length", {n: ("with a bald head",) if n == "bald" else (f"with {n} hair",)
                                          for n in HAIR_LENGTHS}),
        ZeroShotAttribute("eye_color", {c: (f"with {c} eyes",) for c in EYE_COLORS}),
        ZeroShotAttribute("skin_tone", {c: (f"with {c} skin",) for c in SKIN_TONES}),
        ZeroShotAttribute("lip_color", {c: (f"with {c} lips",) for c in LIP_COLORS}),
        # Captions always name the frame ("wearing gold glasses"): ensemble over the frame colours.
        ZeroShotAttribute("glasses", {True: tuple(f"wearing {f} glasses" for f in FRAME_COLORS), False: ("",)}),
        ZeroShotAttribute("beard", {True: ("with a beard",), False: ("",)}),
    ]
