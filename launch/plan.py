"""Scale planner: per-device memory, FLOPs and step time of the real pretraining step; see lnfm/jobs/plan.py.

python launch/plan.py --model vit_h --patch 160 --global-batch 1024 --mesh fsdp=256 --device h100 [--remat full]
python launch/plan.py --table docs/scaling_table.md    # the ViT-B/L/H table of docs/scaling.md
"""

import sys

from lnfm.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("plan", sys.argv[1:]))
