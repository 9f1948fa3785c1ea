"""A prompt's plain words, the text clip_t compares an image with: syntax, TI triggers and LoRA tags taken out.

The rule, so that anyone can recompute clip_t from the manifest (`prompt`, `prompt_syntax`, `steps`, `embeddings`):
- `<lora:...>` tags are removed (the manifest's prompt has none; a prompt written by hand may);
- a1111: prompt editing and alternation as at the last sampler step (`[castle:forest:0.5]` -> `forest`,
  `[castle::0.5]` -> nothing, `[a|b]` -> the option of the last step), then weights and brackets dropped
  (`(castle:1.3)`, `((castle))`, `[castle]` -> `castle`, `\\(` -> `(`), BREAK removed;
- compel: every part's words in order, weights dropped (`castle++`, `(a castle)1.3` -> the words; a `.blend()` or
  `.and()` gives each part's words, joined by a space);
- plain: the text as it is;
- then every `<trigger>` of the job's TIs removed, whitespace collapsed to single spaces, none before `,` `.` `;`.
The result is cut to the CLIP model's token limit by its own tokenizer (truncation), not here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from batchgen.axes import LORA_TAG
from batchgen.prompt_syntax import SYNTAXES, a1111

_SPACE_BEFORE = re.compile(r"\s+([,.;])")


def plain_words(text: str, syntax: str, steps: int, triggers: Iterable[str] = ()) -> str:
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt syntax {syntax!r} is not one of {', '.join(SYNTAXES)}")
    words = LORA_TAG.sub(" ", text)
    if syntax == "a1111":
        words = _a1111_words(words, steps)
    elif syntax == "compel":
        words = _compel_words(words)
    for trigger in triggers:
        words = words.replace(f"<{trigger}>", " ")
    return _SPACE_BEFORE.sub(r"\1", " ".join(words.split()))


def _a1111_words(text: str, steps: int) -> str:
    last = a1111.schedules(text, max(1, steps))[-1][1]
    return " ".join(piece for piece, weight in a1111.attention(last) if (piece, weight) != a1111.BREAK)


def _compel_words(text: str) -> str:
    from compel.prompt_parser import Blend, CrossAttentionControlSubstitute, PromptParser

    try:
        conjunction = PromptParser().parse_conjunction(text)
    except Exception:  # compel raises its own and pyparsing's errors: the text is then read as written
        return text

    def fragments(prompt) -> list[str]:
        out = []
        for child in prompt.children:
            if isinstance(child, CrossAttentionControlSubstitute):
                out += [f.text for f in child.edited]
            else:
                out.append(getattr(child, "text", ""))
        return out

    words: list[str] = []
    for part in conjunction.prompts:
        for prompt in part.prompts if isinstance(part, Blend) else [part]:
            words += fragments(prompt)
    return " ".join(words)
