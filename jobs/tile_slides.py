"""Ray Job entry point: tile slides into OME-Zarr stores.

    ray job submit --working-dir . -- python jobs/tile_slides.py SLIDES... --out tiles/ --mpp 0.5

Takes exactly the arguments of ``wsi-pipeline tile``; connects to the cluster the job runs on.
"""

from __future__ import annotations

import sys

from wsi_pipeline.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["tile", *sys.argv[1:]]))
