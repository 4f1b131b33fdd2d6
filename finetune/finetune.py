"""Lymph-node segmentation finetuning at one site; see `lnfm.jobs.finetune` and docs/finetuning.md.

python finetune/finetune.py --site pelvis --data STORE --init PRETRAIN_DIR_OR_EXPORT|scratch --workdir DIR
    [--num-labeled N] [--repeats R] [--quick] [key=value ...]
"""

import sys

from lnfm.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("finetune", sys.argv[1:]))
