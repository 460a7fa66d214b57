"""Runs ``clip_dro.trainer.train`` once per set of overrides given as JSON on the command line, in this process
group (under torchrun: every set at the same number of processes, one launch for all)."""
import json
import sys

from clip_dro.config import load_config
from clip_dro.trainer import train

if __name__ == "__main__":
    config, runs = sys.argv[1], json.loads(sys.argv[2])
    for overrides in runs:
        train(load_config(config, overrides))
