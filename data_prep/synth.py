"""Write synthetic lymph-node CT phantoms (see `lnfm.data.synth`).

python data_prep/synth.py --site SITE|all --num-cases N --seed S --out DIR [--pet] [--stations]
    [--shape X,Y,Z] [--no-gallery] [--no-real-shapes]
"""

import sys

from lnfm.data.synth import main

if __name__ == "__main__":
    sys.exit(main())
