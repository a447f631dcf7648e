"""Prompts for task=generate: read from the config list and/or a file, checked against the tokenizer.

A prompt longer than the CLIP tokenizer's context length would be truncated silently by open_clip
(the end of the prompt dropped); it is refused instead, with its token count. Empty prompts are
refused too, and so are prompts that clean to no tokens ("&nbsp;", "&#32;": open_clip unescapes HTML and
drops whitespace): CLIP embeds them as it embeds "", a fixed vector that means nothing the user asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UserError


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str  # where it came from, for error messages: "task.prompts[1]" or "task.prompts_file=f line 3"


def read_prompts_file(path: str | Path) -> list[Prompt]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task.prompts_file={path}: no such file (expected a text file with one prompt per line)")
    try:
        # utf-8-sig: a byte-order mark (Windows editors) would otherwise glue itself to the first line
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"task.prompts_file={path}: unreadable as UTF-8 text ({err})") from None
    return [Prompt(line.strip(), f"task.prompts_file={path} line {number}")
            for number, line in enumerate(lines, start=1) if line.strip() and not line.strip().startswith("#")]


def gather_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[Prompt]:
    """The prompts of ``task.prompts`` followed by those of ``task.prompts_file``; at least one."""
    gathered = [Prompt(str(p).strip() if p is not None else "", f"task.prompts[{i}]") for i, p in enumerate(prompts)]
    if prompts_file:
        gathered += read_prompts_file(prompts_file)
    if not gathered:
        raise UserError("no prompts: set task.prompts=['a photo of a person with red hair'] or task.prompts_file=<file "
                        "with one prompt per line>")
    return gathered


def context_length(tokenizer) -> int:
    length = getattr(tokenizer, "context_length", None)
    if not isinstance(length, int) or length < 2:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no context_length")
    return length


def token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` as the model sees them, start and end tokens included, before any truncation."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # open_clip's SimpleTokenizer (BPE)
        return len(tokenizer.encode(text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a Hugging Face tokenizer
    if inner is not None and callable(inner):
        return len(inner(text)["input_ids"])
    raise TypeError(f"cannot count the tokens of a {type(tokenizer).__name__}")


def validate_prompts(prompts: Sequence[Prompt], tokenizer) -> list[str]:
    """The prompt texts; UserError naming every empty (also once cleaned) or over-long prompt and where it
    came from."""
    limit = context_length(tokenizer)
    nothing = token_count(tokenizer, "")  # the start and end tokens alone
    problems = []
    for prompt in prompts:
        if not prompt.text:
            problems.append(f"{prompt.source}: empty prompt (expected some text)")
            continue
        count = token_count(tokenizer, prompt.text)
        shown = f"{prompt.source}={prompt.text[:60]!r}{'...' if len(prompt.text) > 60 else ''}"
        if count <= nothing:
            problems.append(f"{shown}: no tokens once the tokenizer has cleaned it (HTML entities unescaped, "
                            "whitespace dropped), so it embeds like an empty prompt; expected some text")
        elif count > limit:
            problems.append(f"{shown}: {count} tokens, more than the tokenizer's context length {limit} (it would be "
                            f"truncated); shorten it")
    if problems:
        raise UserError("bad prompts:\n  " + "\n  ".join(problems))
    return [p.text for p in prompts]
