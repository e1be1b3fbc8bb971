"""The predictor: a Ray Data callable class that turns batches of RGB tiles into probabilities.

It loads a checkpoint once per actor and runs on the GPU when there is one (bf16 autocast,
``channels_last``) and on the CPU otherwise, with the same code (:mod:`wsi_pipeline.forward`).
Probabilities travel as uint8 (:func:`~wsi_pipeline.segment.quantize.quantize`), to keep the
object store small; with ``tensor_instances`` the predictor finds the instances itself, on its
device (:mod:`~wsi_pipeline.segment.tensor_instances`), and hands on their labels with the
background probability only.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from wsi_pipeline.checkpoint import load_checkpoint
from wsi_pipeline.forward import choose_device, forward, probabilities
from wsi_pipeline.segment.quantize import TENSOR_MODES, quantize
from wsi_pipeline.segment.tensor_instances import rounded_to_levels, tensor_instances

logger = logging.getLogger(__name__)


class Predictor:
    """Batches of tiles → class probabilities. Use with ``map_batches`` and an actor pool.

    Args:
        checkpoint: checkpoint directory or shipped model name (see :mod:`wsi_pipeline.checkpoint`).
        device: ``"auto"`` (CUDA if available), ``"cuda"`` or ``"cpu"``.
        tta: average over horizontal and vertical flips (3x the compute).
        threads: intra-op threads on a CPU (default: every core this process may use). Ray
            sets one thread per logical CPU an actor asks for; on a CPU host the model is the
            bottleneck and reads and post-processing leave cores idle between its batches.
        tensor_instances: find each tile's instances here, as tensor operations (the card's
            target mode must be one of ``TENSOR_MODES``): batches leave with ``labels`` and
            ``probs`` holding the background channel alone. Should that fail (memory, say),
            this actor warns once and hands on probabilities instead, for post-processing to
            find the instances: the job goes on.
    """

    def __init__(
        self,
        checkpoint: str,
        *,
        device: str = "auto",
        tta: bool = False,
        threads: int | None = None,
        tensor_instances: bool = False,
    ) -> None:
        self.device = choose_device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        model, self.card = load_checkpoint(checkpoint, device=self.device)
        self.model = model.to(memory_format=torch.channels_last)
        self.tta = tta
        if tensor_instances and self.card.target_mode not in TENSOR_MODES:
            raise ValueError(f"tensor_instances: no tensor path for {self.card.target_mode!r}")
        self.tensor_instances = tensor_instances

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        images = batch.pop("image")
        instances_s = 0.0
        with torch.inference_mode():
            probs = self._predict(images)
            if self.tensor_instances:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the forward's seconds are its own
                instances_start = time.perf_counter()
                labels = self._instances(probs)
                instances_s = time.perf_counter() - instances_start
                if labels is not None:
                    batch["labels"] = labels
                    batch["predictor_instances_s"] = _per_tile(instances_s, len(images))
                    probs = probs[:, :1]  # the background: the nucleus probability is 1 - it
            batch["probs"] = quantize(probs.cpu().numpy())
        batch["forward_s"] = _per_tile(time.perf_counter() - start - instances_s, len(images))
        return batch

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 → ``(B, K, H, W)`` float32 probabilities."""
        return self._predict(images).cpu().numpy()

    def _predict(self, images: np.ndarray) -> torch.Tensor:
        # Ray Data may hand over read-only views (its Arrow blocks); torch wants its own memory.
        writable = images.flags.writeable and images.flags.c_contiguous
        x = torch.from_numpy(images if writable else np.array(images)).to(self.device)
        probs = self._probabilities(x)
        if self.tta:  # x is (B, H, W, 3); probabilities are (B, K, H, W)
            probs = probs + self._probabilities(x.flip(2)).flip(-1)
            probs = (probs + self._probabilities(x.flip(1)).flip(-2)) / 3
        return probs

    def _instances(self, probs: torch.Tensor) -> np.ndarray | None:
        """``(B, H, W)`` labels of the probabilities in the steps they travel in, as the
        post-processing of probabilities would find them; None (from now on) if that fails."""
        post = self.card.postprocess.model_dump()
        try:
            labels = tensor_instances(rounded_to_levels(probs), self.card.target_mode, **post)
        except Exception as exc:  # e.g. out of GPU memory: post-processing can do it instead
            logger.warning("tensor instances failed, post-processing finds them: %s", exc)
            self.tensor_instances = False
            return None
        # Every instance has min_size pixels or more: the dtype follows from the tile's area.
        most = probs.shape[2] * probs.shape[3] // max(self.card.postprocess.min_size, 1)
        return labels.cpu().numpy().astype(np.uint16 if most < 2**16 else np.int32)

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        autocast = self.device.type == "cuda"
        logits = forward(self.model, x, self.card.normalization, autocast=autocast)
        return probabilities(logits, self.card.target_mode)


def _per_tile(seconds: float, tiles: int) -> np.ndarray:
    """A batch's seconds, shared equally by its tiles (a column of the batch)."""
    return np.full(tiles, seconds / tiles)
