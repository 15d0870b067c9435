"""HTTP serving: a FastAPI app (`app.create_app`), its contract (`schemas`: request models carrying the
limits, response models, the one error body), a dynamic batcher owning the model in one worker thread
(`batcher.DynamicBatcher`) and the request limits (`limits.ServeLimits`).

FastAPI and uvicorn are the optional extra ``prott5nv[serve]``; only :mod:`.app` and :mod:`.schemas`
import them (pydantic), so the batcher and the limits (and the rest of the package) work without it.
"""

from __future__ import annotations

from .limits import ServeLimits

__all__ = ["ServeLimits"]
