"""How many 75-token chunks a plain text takes with a model's own tokenizer, for the planner.

A prompt and a negative prompt with different chunk counts render differently under pad_prompts=false (A1111's
separate passes) than batchgen did before that setting (padding), so the planner must know, for the job_id, which
jobs those are. Counting loads the tokenizer files (no torch), and only for a text that might need a second chunk:
a CLIP token covers at least one byte of the text, and a TI trigger becomes one token per vector.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from batchgen.assets.embeddings import TRIGGER_PATTERN
from batchgen.errors import BatchgenError
from batchgen.spec import ModelSpec

CHUNK = 75  # tokens between a chunk's start and end tokens


class ChunkCounter:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._tokenizer = None
        self._counts: dict[str, int] = {}

    def chunks(self, text: str) -> int:
        vectors = {ti.trigger: max(ti.vectors, 1) for ti in self.spec.embeddings}
        found = [t for t in TRIGGER_PATTERN.findall(text) if t in vectors]
        if len(text.encode()) + sum(vectors[t] for t in found) <= CHUNK:
            return 1
        if text not in self._counts:
            # A registered trigger is split out before BPE, so the words around it tokenize on their own.
            rest = TRIGGER_PATTERN.sub(lambda m: " " if m.group(1) in vectors else m.group(0), text)
            ids = self._load()(rest, truncation=False, add_special_tokens=False).input_ids
            self._counts[text] = max(1, math.ceil((len(ids) + sum(vectors[t] for t in found)) / CHUNK))
        return self._counts[text]

    def _load(self):
        if self._tokenizer is None:
            import transformers  # no torch: tokenizers only

            spec = self.spec
            folder = dict(spec.single_file.tokenizers).get("tokenizer") if spec.single_file else None
            folder = Path(folder or spec.config_dir / "tokenizer")
            try:
                index = json.loads((spec.config_dir / "model_index.json").read_text())
                cls = getattr(transformers, index["tokenizer"][1])
                self._tokenizer = cls.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise BatchgenError(
                    f"model {spec.name}: cannot read its tokenizer in {folder} to count a long prompt's chunks "
                    f"({type(e).__name__}); check the model folder"
                ) from None
        return self._tokenizer
