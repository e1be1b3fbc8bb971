"""Ray Job entry point: score a checkpoint (or predicted label images) on a folder dataset.

    ray job submit --working-dir . -- python jobs/evaluate.py \\
        --checkpoint /shared/runs/lanet/best \\
        --data /shared/data/monuseg_train --split test_same_organ,test_other_organ

Takes exactly the arguments of ``wsi-pipeline evaluate``; prints one JSON line.
"""

from __future__ import annotations

import sys

from wsi_pipeline.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
