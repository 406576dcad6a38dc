"""Task name -> trainer module (each has ``train_and_evaluate(config, workdir)``)."""

import importlib

TRAINERS = {
    "node_classification": "train.node_classify",
    "image_classification": "train.classify",
    "segmentation": "train.segment",
    "pipeline": "train.pipeline",
}


def trainer_for(task: str):
  if task not in TRAINERS:
    raise ValueError(f"config.task must be one of {sorted(TRAINERS)}, got "
                     f"{task!r}")
  return importlib.import_module(TRAINERS[task])
