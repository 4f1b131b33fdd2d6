"""Self-supervised pretraining (MAE on ViT, SimMIM on Swin); see `lnfm.jobs.pretrain` and docs/pretraining.md.

python pretrain/pretrain.py --config NAME_OR_YAML --data STORE[,STORE...] --workdir DIR
    [--profile-steps A:B] [--coordinator HOST:PORT --num-processes N --process-id I] [key=value ...]
"""

import sys

from lnfm.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("pretrain", sys.argv[1:]))
