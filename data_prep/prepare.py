"""Convert raw CT cases into an LNFM TensorStore dataset (see `lnfm.data.prepare`).

python data_prep/prepare.py --input FOLDER_OR_CSV --output STORE [--spacing X,Y,Z] [--workers N]
    [--num-shards N --shard-index I] [--site SITE] [key=value ...]
"""

import sys

from lnfm.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
