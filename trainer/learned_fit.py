"""A version's learned router (router/learned.py), trained in its training cycle.

Evidence: where *this* candidate agreed with the teacher on its holdout (the evaluation
already answers every holdout prompt). The live version's shadow pairs describe another
model: trained on them, the router vetoed 72 % of the candidate's CLINC150 test prompts
(the previous version agreed on 53 %) and served half as much at equal agreement (README,
"The learned router"). The features are the prompt's embedding and its score under the candidate's own
OOD detector, as the router computes them when it serves this version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.config import RouteConfig
from trainer.dataset import Example

logger = logging.getLogger(__name__)


def fit_learned_router(config: RouteConfig, version: str, embedder: Callable[[], Any], holdout: Sequence[Example],
                       agrees: Sequence[bool], detector_path: str | Path | None, path: Path) -> dict[str, Any]:
    """Fit and save the version's learned router; returns the summary the registry keeps:
    ``pairs``, ``agree_rate``, ``cv_auroc`` and ``path`` when one was saved, else ``skipped``
    saying why (too few pairs, one class only, no detector). ``embedder``: made on first use."""
    if detector_path is None:
        summary: dict[str, Any] = {"pairs": len(agrees), "skipped": "no ood detector: the router reads its score"}
    else:
        from router.learned import fit_for_version
        from router.ood import load_detector
        from router.tuned import detector_embeddings

        texts = [example.prompt_text for example in holdout]
        embeddings = embedder().encode(texts)
        detector = load_detector(detector_path)
        scores = detector.score(detector_embeddings(detector, embedder(), texts))
        model, summary = fit_for_version(embeddings, scores, agrees, min_pairs=config.learned_router.min_pairs,
                                         min_agree=config.learned_router.min_agree)
        if model is not None:
            summary["path"] = str(model.save(path))
    if "skipped" in summary:
        logger.warning("this version has no learned router", extra={"route": config.name, "version": version,
                                                                     **summary})
    else:
        logger.info("learned router trained", extra={"route": config.name, "version": version, **summary})
    return summary
