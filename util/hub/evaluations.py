"""The evaluations of exactly the weights being published, from a run folder's eval-*/ folders.

engine_mar.evaluate writes eval-*/settings.json (every setting that changes the images, with the sha256
of the weights it sampled with) and eval-*/metrics.json (FID, IS, precision/recall, the digits demo's
accuracy, ...). An evaluation belongs in the model card only when that sha256 is the published
weights' own: an evaluation of the live weights or of another epoch is left out (and logged).
"""
import json
import logging
from pathlib import Path

from util.evaluation.eval_folder import SETTINGS, state_digest
from util.evaluation.sweep import best_point

logger = logging.getLogger(__name__)

# what the card reports of an evaluation: its settings, then its scores
SETTINGS_SHOWN = ("epoch", "num_images", "cfg", "cfg_schedule", "temperature", "num_iter", "weights")
SETTINGS_EXTRA = ("cfg_sampler", "seed", "precision", "eval_bsz")  # from settings.json
SCORES = ("fid", "inception_score", "inception_score_std", "precision", "recall", "accuracy", "real_accuracy")


def evaluations_of(run_folder, state):
    """[{"folder", settings..., scores...}] of the evaluations in run_folder/eval-*/ that sampled with `state`
    (a state dict in the model's order), in folder-name order."""
    paths = sorted(Path(run_folder).glob("eval-*/metrics.json"))
    if not paths:
        return []
    digest = state_digest(state)
    found, other = [], []
    for path in paths:
        try:
            settings = json.loads((path.parent / SETTINGS).read_text())
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            logger.warning("%s: unreadable (%s): left out of the model card", path.parent, type(err).__name__)
            continue
        if not isinstance(settings, dict) or not isinstance(metrics, dict):
            logger.warning("%s: not an evaluation's files: left out of the model card", path.parent)
            continue
        if settings.get("weights_sha256") != digest:
            other.append(path.parent.name)
            continue
        entry = {"folder": path.parent.name}
        entry.update({k: metrics[k] for k in SETTINGS_SHOWN + SCORES if k in metrics})
        entry.update({k: settings[k] for k in SETTINGS_EXTRA if k in settings})
        found.append(entry)
    if other:
        logger.info("left out %d evaluation(s) of other weights (live weights or another epoch): %s", len(other),
                    ", ".join(other[:3]) + (", ..." if len(other) > 3 else ""))
    return found


def best(evaluations):
    """The evaluation to quote first: a sweep's best point (the lowest finite FID, else the highest accuracy),
    else the first; None if none."""
    if not evaluations:
        return None
    ranked = best_point(evaluations)
    return ranked[0] if ranked is not None else evaluations[0]
