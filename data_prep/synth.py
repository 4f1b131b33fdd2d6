"""Write synthetic lymph-node CT phantoms (see `lnfm.data.synth`).

python data_prep/synth.py --site SITE|all --num-cases N --seed S --out DIR [--pet] [--stations]
    [--shape X,Y,Z] [--no-gallery] [--no-real-shapes]
"""

import sys

from lnfm.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("synth", sys.argv[1:]))
