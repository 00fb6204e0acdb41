"""DetectionResult: per-prompt scores of sharpfast.detect."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DetectionResult:
    """scores[m]: (P,) float32 CPU tensor; per_image[m]: (P, n); warnings[i]: notes for prompt i."""

    prompts: list
    scores: dict
    per_image: dict
    warnings: list
    config: dict = field(default_factory=dict)

    @property
    def metrics(self) -> list:
        """The metrics scored."""
        return list(self.scores)

    def __len__(self) -> int:
        return len(self.prompts)

    def to_records(self) -> list[dict]:
        """One JSON-serializable dict per prompt."""
        records = []
        for i, prompt in enumerate(self.prompts):
            rec = {"prompt": prompt}
            rec.update({m: float(self.scores[m][i]) for m in self.scores})
            rec["per_image"] = {m: [float(v) for v in self.per_image[m][i]] for m in self.per_image}
            rec["warnings"] = list(self.warnings[i])
            records.append(rec)
        return records

    def __repr__(self) -> str:
        means = ", ".join(f"{m}: mean {float(torch.as_tensor(v).mean()):.4g}" for m, v in self.scores.items())
        return f"DetectionResult({len(self)} prompts; {means})"
