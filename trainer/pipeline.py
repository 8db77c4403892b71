"""One training cycle for a route: dataset → train → OOD detector → evaluate vs live → registry.

``Trainer.run(route)`` produces a registry row with status ``candidate`` (passed the gate)
or ``rejected``; it never makes a version live (that is the hot swap's job). A crash
mid-run leaves nothing promotable: the adapter appears only by an atomic rename, the
registry row is written last, and the training run is recorded as ``failed``. A rerun of
the same version on the same data resumes from the run's checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.config import RouteConfig, Settings, TrainingConfig
from core.registry import CandidateVersion, Registry
from core.store import Store
from trainer.dataset import Dataset, Example, build_dataset, fresh_examples, labels_for_route
from trainer.learned_fit import fit_learned_router

logger = logging.getLogger(__name__)

def make_private(root: Path) -> None:
    """An adapter is distilled from logged prompts: this user's only (0700/0600), whatever the
    umask of the process that trained it."""
    for path in [root.parent, root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() else 0o600)


def warm_epochs(training: TrainingConfig, new: int, total: int) -> float:
    """A warm cycle's epochs over its new answers plus replay: ``warm_start_epochs``, or more
    when the new answers are much of the route's data, so that they get at least the share of
    a cold run's passes that they make of it (never more than a cold run). The full demo's
    first warm cycle added 940 answers to 415, and 4 epochs left it at 0.41 holdout agreement."""
    return min(training.epochs, max(training.warm_start_epochs, training.epochs * new / max(1, total)))


class NotEnoughData(Exception):
    """The route has too few curated examples to train or evaluate a student."""


class Trainer:
    def __init__(self, settings: Settings, store: Store, *, adapters_root: str | Path | None = None,
                 min_train_examples: int = 20, min_holdout_examples: int = 5,
                 embedder_factory: Callable[[], Any] | None = None,
                 train_overrides: dict[str, Any] | None = None, progress: bool = True,
                 fit_detector: bool = True, keep_reasoning: bool = False) -> None:
        self.settings = settings
        self.store = store
        self.registry = Registry(store)
        self.adapters_root = Path(adapters_root if adapters_root is not None else settings.store.adapters_dir)
        self.min_train_examples = min_train_examples
        self.min_holdout_examples = min_holdout_examples
        self.embedder_factory = embedder_factory
        self.train_overrides = train_overrides or {}
        self.progress = progress
        self.fit_detector = fit_detector
        # Rationale distillation: train on the teacher's <think>…</think> + answer.
        self.keep_reasoning = keep_reasoning
        self._embedder_instance: Any = None

    def _route(self, route: RouteConfig | str) -> RouteConfig:
        if isinstance(route, RouteConfig):
            return route
        config = self.settings.route(route)
        if config is None:
            raise KeyError(f"no route named {route!r} in the configuration")
        return config

    def run(self, route: RouteConfig | str) -> CandidateVersion:
        """Train, evaluate and register one new version of ``route``'s student."""
        config = self._route(route)
        started = time.time()
        version = self.registry.next_version(config.name)
        detail: dict[str, Any] = {}
        try:
            candidate = self._cycle(config, version, detail)
        except BaseException as error:
            detail["error"] = f"{type(error).__name__}: {error}"
            outcome = "skipped" if isinstance(error, NotEnoughData) else "failed"
            self._record_run(config.name, started, outcome, version, detail)
            logger.error("training cycle did not produce a version",
                         extra={"route": config.name, "version": version, "outcome": outcome, **detail})
            raise
        self._record_run(config.name, started, candidate.status, version, detail)
        return candidate

    def _cycle(self, config: RouteConfig, version: str, detail: dict[str, Any]) -> CandidateVersion:
        labels = labels_for_route(config)
        dataset = build_dataset(self.store, config, labels=labels, keep_reasoning=self.keep_reasoning)
        detail["dataset"] = dataset.summary()
        self._check_size(dataset)
        out_dir = self.adapters_root / config.name / version
        adapter_dir = out_dir / "adapter"
        # ``version`` is not in the registry, so an adapter already there is the leftover of a
        # run that crashed after training (during the detector fit or the evaluation).
        # The checkpoint beside it is kept: a rerun on the same data resumes from it.
        shutil.rmtree(adapter_dir, ignore_errors=True)
        trained = self._train(config, dataset, adapter_dir, version)
        detail["train"] = trained
        detector_path = self._fit_detector(config, dataset, out_dir / "detector")
        make_private(out_dir)
        evaluation = self._evaluation_set(config, dataset, labels)
        fresh = detail["dataset"]["fresh"] = len(evaluation) - len(dataset.holdout)
        metrics, agrees = self._evaluate(config, evaluation, adapter_dir, labels, detector_path, version)
        metrics["evaluated_on"] = {"holdout": len(dataset.holdout), "fresh": fresh}
        metrics["learned_router"] = fit_learned_router(config, version, self.embedder, evaluation, agrees,
                                                       detector_path, out_dir / "learned_router")
        make_private(out_dir)
        detail["gate"] = metrics["gate"]
        live = self.registry.live(config.name)
        candidate = CandidateVersion(
            route=config.name, version=version, status="candidate" if metrics["gate"]["passed"] else "rejected",
            adapter_path=str(adapter_dir), detector_path=str(detector_path) if detector_path else None,
            parent=live.version if live else None, metrics={**metrics, "train": trained},
            train_examples=len(dataset.train), holdout_examples=len(dataset.holdout),
            note=metrics["gate"]["reason"],
        )
        logger.info("training cycle finished", extra={"route": config.name, "version": version,
                                                      "status": candidate.status, "gate": metrics["gate"]})
        return self.registry.record(candidate)

    def _check_size(self, dataset: Dataset) -> None:
        if len(dataset.train) < self.min_train_examples or len(dataset.holdout) < self.min_holdout_examples:
            raise NotEnoughData(f"route {dataset.route}: {len(dataset.train)} training and {len(dataset.holdout)} "
                                f"holdout examples; need {self.min_train_examples} and {self.min_holdout_examples}")

    def _train(self, config: RouteConfig, dataset: Dataset, adapter_dir: Path, version: str) -> dict[str, Any]:
        from trainer.train import TrainParams, train_adapter

        params = TrainParams.from_route(config, **self.train_overrides)
        examples, warm_from = dataset.train, None
        warm = self._warm_start(config, dataset, params) if "init_adapter" not in self.train_overrides else None
        if warm is not None:
            warm_from, examples, new = warm
            params = params.model_copy(update={"init_adapter": str(Path(warm_from.adapter_path)),
                                               "epochs": warm_epochs(config.training, new, len(dataset.train))})
        result = train_adapter(config.student.base_model, examples, adapter_dir, params,
                               progress=self.progress,
                               metadata={"route": config.name, "version": version, "newest_at": dataset.newest_at,
                                         "system_prompt": config.student.system_prompt,
                                         "warm_start_from": warm_from.version if warm_from else None})
        return {**result.to_dict(), "warm_start_from": warm_from.version if warm_from else None}

    def _warm_start(self, config: RouteConfig, dataset: Dataset,
                    params: Any) -> tuple[Any, list[Any], int] | None:
        """Continual training: the version to start from, this cycle's examples and how many
        of them are new, or None.

        The examples are those newer than that version's data plus a seeded replay sample
        of older ones (``replay_ratio`` times as many), so a cycle costs about the same however
        much data the route has gathered. Any doubt (no version to start from, another base or
        method, an adapter without its data's timestamp) means a cold full retrain.
        """
        live = self._warm_source(config.name)
        if not config.training.warm_start or live is None:
            return None
        meta_path = Path(live.adapter_path) / "distillgate.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        same_base = Path(str(meta.get("base_dir", ""))).resolve() == Path(config.student.base_model).resolve()
        newest_at = meta.get("newest_at")
        if not same_base or meta.get("params", {}).get("method") != params.method or newest_at is None:
            return None
        new = [example for example in dataset.train if example.created_at > float(newest_at)]
        old = [example for example in dataset.train if example.created_at <= float(newest_at)]
        if not new:
            return None
        replay = random.Random(f"{config.name}:{len(dataset.train)}").sample(
            old, min(len(old), round(config.training.replay_ratio * len(new))))
        logger.info("warm start", extra={"route": config.name, "from": live.version, "new": len(new),
                                         "replay": len(replay)})
        return live, new + replay, len(new)

    def _warm_source(self, route: str) -> CandidateVersion | None:
        """The live version; before the first promotion, the newest trained one. A candidate
        the gate rejected still learned from the same teacher answers, and the gate judges
        what a cycle produces, not where it starts: starting from it cuts the next cycle's
        cost to a third (bench/train.py: warm 4 epochs on new + replay vs cold 10 on all)."""
        live = self.registry.live(route)
        if live is not None:
            return live
        return next((version for version in self.registry.list(route)
                     if version.status in ("candidate", "rejected") and Path(version.adapter_path).exists()), None)

    def embedder(self) -> Any:
        """The router's embedder, made on first use: the detector and learned router are fitted with it."""
        if self._embedder_instance is None:
            self._embedder_instance = (self.embedder_factory() if self.embedder_factory
                                       else _default_embedder(self.settings))
        return self._embedder_instance

    def _fit_detector(self, config: RouteConfig, dataset: Dataset, path: Path) -> Path | None:
        """The router's OOD detector, fitted on this version's training prompts (with their
        teacher answers when the cascade weighs neighbours' answers). With
        ``cascade.mask_escalated_prompts``, prompts the teacher answered with an escalate answer
        (``oos``) only vote: in the score they pull the next out-of-scope prompts in (README,
        "The cascade")."""
        if not self.fit_detector:
            return None
        try:
            from router.ood import fit_detector_for_texts
        except ImportError:
            logger.warning("router.ood is unavailable; this version has no OOD detector", extra={"route": config.name})
            return None
        texts = [example.prompt_text for example in dataset.train]
        answers = [example.answer for example in dataset.train]
        labels = answers if config.labels_dataset is not None else None
        voting = config.cascade.disagreement_penalty > 0
        scored = [not (config.cascade.mask_escalated_prompts and config.cascade.escalates(answer))
                  for answer in answers]
        return Path(fit_detector_for_texts(texts, labels, config.ood_detector, path, self.embedder(),
                                           answers=answers if voting else None, vote_k=config.cascade.neighbours,
                                           scored=None if all(scored) or sum(scored) < 2 else scored))

    def neighbours(self, config: RouteConfig, examples: Sequence[Example],
                   detector_path: str | Path | None) -> list[tuple[int, ...]] | None:
        """The teacher's answers to each example prompt's nearest training prompts, as the
        router finds them with this detector when serving; None when it keeps no answers."""
        if detector_path is None or config.cascade.disagreement_penalty == 0 or not examples:
            return None
        from router.ood import load_detector
        from router.tuned import detector_embeddings

        detector = load_detector(detector_path)
        if getattr(detector, "answer_hashes", None) is None:
            return None
        embeddings = detector_embeddings(detector, self.embedder(), [example.prompt_text for example in examples])
        _, nearest = detector.score_with_neighbours(embeddings)
        return [tuple(int(value) for value in row) for row in nearest]

    def _evaluation_set(self, config: RouteConfig, dataset: Dataset, labels: set[str] | None) -> list[Example]:
        """The holdout, topped up to ``training.min_evaluation_examples`` with answers logged
        while the candidate trained."""
        fresh = fresh_examples(self.store, config, dataset,
                               limit=config.training.min_evaluation_examples - len(dataset.holdout),
                               labels=labels, keep_reasoning=self.keep_reasoning)
        return [*dataset.holdout, *fresh]

    def _evaluate(self, config: RouteConfig, examples: list[Example], adapter_dir: Path, labels: set[str] | None,
                  detector_path: Path | None, version: str) -> tuple[dict[str, Any], list[bool]]:
        """Candidate and live student on the same examples, and the gate's verdict; with, per
        example, whether the candidate agreed with the teacher."""
        from trainer.evaluate import evaluate_adapter, gate

        base = config.student.base_model
        options = {"labels": labels, "confidence_threshold": config.confidence_threshold,
                   "cascade": config.cascade, "seed": f"{config.name}:{version}"}
        candidate = evaluate_adapter(base, adapter_dir, examples,
                                     neighbours=self.neighbours(config, examples, detector_path), **options)
        live_version = self.registry.live(config.name)
        live = None
        if live_version is not None and Path(live_version.adapter_path).exists():
            live = evaluate_adapter(base, live_version.adapter_path, examples, **options,
                                    neighbours=self.neighbours(config, examples, live_version.detector_path))
        decision = gate(candidate, live, config.gate)
        return {"candidate": candidate.to_dict(), "live": live.to_dict() if live else None,
                "live_version": live_version.version if live_version else None,
                "gate": {"passed": decision.passed, "reason": decision.reason, "metric": decision.metric,
                         "candidate": decision.candidate, "live": decision.live}}, candidate.agrees

    def _record_run(self, route: str, started: float, outcome: str, version: str, detail: dict[str, Any]) -> None:
        import json

        self.store.record_training_run({"route": route, "started_at": started, "finished_at": time.time(),
                                        "outcome": outcome, "version": version,
                                        "detail_json": json.dumps(detail, default=str)})


def _default_embedder(settings: Settings) -> Any:
    """The embedder the gateway serves with (``router.embedder``), built on first use."""
    from router.artifacts import create_embedder

    return create_embedder(settings.router, build=True)
