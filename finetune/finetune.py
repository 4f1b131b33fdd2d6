"""Lymph-node segmentation finetuning at one site; see `lnfm.jobs.finetune` and docs/finetuning.md.

python finetune/finetune.py --site pelvis --data STORE --init PRETRAIN_DIR_OR_EXPORT|scratch --workdir DIR
    [--num-labeled N] [--repeats R] [--quick] [key=value ...]
"""

import sys

from lnfm.jobs.finetune import main

if __name__ == "__main__":
    sys.exit(main())
