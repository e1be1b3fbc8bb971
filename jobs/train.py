"""Ray Job entry point: train a nuclei model with Ray Train.

    ray job submit --working-dir . -- python jobs/train.py --config configs/train/lanet.yaml \\
        --data /shared/train.zarr --out /shared/runs/lanet --workers 4 --gpu

Takes exactly the arguments of ``wsi-pipeline train`` (``--data`` defaults to train.zarr and
``--out`` to runs/<name>); connects to the cluster the job runs on. ``--out`` must be storage
every node can reach; running the same command again resumes the run.
"""

from __future__ import annotations

import sys

from wsi_pipeline.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
