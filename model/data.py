"""The model's data side, by job (this module re-exports their public names):

- model/shards.py: `ShardSet`, the image index and objects of a shard folder (via open_run).
- model/targets.py: the targets of one image for one task (`build_target`; the task's planner is
  picked by model/tasks.py's `plan_targets`).
- model/loader.py: `MixtureLoader`, seeded, resumable training batches from a mix.yaml.
- model/eval_data.py: `iter_eval_samples`, evaluation samples with original-frame ground truth.
"""

from model.eval_data import iter_eval_samples
from model.loader import MixtureLoader, collate
from model.mixture import load_mixture
from model.shards import ImageEntry, ShardSet, image_hashes
from model.targets import (
    FOREGROUND_PROMPT,
    TEMPLATES,
    Obj,
    Plan,
    build_target,
    group_masks,
    usable_objects,
)
from model.tasks import VOCAB_TASKS, plan_targets

__all__ = ["FOREGROUND_PROMPT", "TEMPLATES", "VOCAB_TASKS", "ImageEntry", "MixtureLoader", "Obj",
           "Plan", "ShardSet", "build_target", "collate", "group_masks", "image_hashes",
           "iter_eval_samples", "load_mixture", "plan_targets", "usable_objects"]
