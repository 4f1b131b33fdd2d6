"""Convert raw CT cases into an LNFM TensorStore dataset (see `lnfm.data.prepare`).

python data_prep/prepare.py --input FOLDER_OR_CSV --output STORE [--spacing X,Y,Z] [--workers N]
    [--num-shards N --shard-index I] [--site SITE] [key=value ...]
"""

import sys

from lnfm.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("prepare", sys.argv[1:]))
