"""Few-shot transfer study on phantoms; see `lnfm.jobs.study` and docs/results/.

python finetune/study.py --quick --workdir runs/study --out docs/results [key=value ...]
python finetune/study.py --config full --workdir runs/study_full --out docs/results_full
"""

import sys

from lnfm.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("study", sys.argv[1:]))
