"""Ray Job entry point: segment slides into QuPath GeoJSON nuclei.

    ray job submit --working-dir . -- python jobs/segment_slides.py --config configs/segment.yaml \\
        /shared/slides/ --checkpoint /shared/models/nuclei --out /shared/results

Takes exactly the arguments of ``wsi-pipeline segment``; connects to the cluster the job runs on.
"""

from __future__ import annotations

import sys

from wsi_pipeline.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
