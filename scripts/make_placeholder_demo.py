"""Write the placeholder `prott5nv-demo`: the `tiny` megatron preset with *random* weights (seed 0).

It exists only so that the pipeline runs out of the box until a pretrained demo model replaces it; its
embeddings carry no biological signal. Reproducible: same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prott5nv.checkpoint import PRETRAINED_DIR, save_pretrained
from prott5nv.model.config import preset
from prott5nv.model.t5 import T5Model
from prott5nv.tokenizer import ProteinTokenizer

torch.manual_seed(0)
model = T5Model(preset("tiny"))
out = save_pretrained(model, ProteinTokenizer(), PRETRAINED_DIR / "prott5nv-demo",
                      extra={"weights": "random (placeholder, seed 0)", "preset": "tiny"})
(Path(out) / "README.md").write_text(
    "# prott5nv-demo (placeholder)\n\nRandomly initialised `tiny` megatron-family model (seed 0), made by\n"
    "`python scripts/make_placeholder_demo.py`. Its embeddings carry no biological signal; it only lets\n"
    "the pipeline run until a pretrained demo model replaces it.\n"
)
print(f"wrote {out}")
