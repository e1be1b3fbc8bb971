"""The predictor: a Ray Data callable class that turns batches of RGB tiles into probabilities.

It loads a checkpoint once per actor and runs on the GPU when there is one (bf16 autocast,
``channels_last``) and on the CPU otherwise, with the same code (:mod:`wsi_pipeline.forward`).
Probabilities travel as uint8 (:func:`~wsi_pipeline.segment.quantize.quantize`), to keep the
object store small.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from wsi_pipeline.checkpoint import load_checkpoint
from wsi_pipeline.forward import choose_device, forward, probabilities
from wsi_pipeline.segment.quantize import quantize


class Predictor:
    """Batches of tiles → class probabilities. Use with ``map_batches`` and an actor pool.

    Args:
        checkpoint: checkpoint directory or shipped model name (see :mod:`wsi_pipeline.checkpoint`).
        device: ``"auto"`` (CUDA if available), ``"cuda"`` or ``"cpu"``.
        tta: average over horizontal and vertical flips (3x the compute).
        threads: intra-op threads on a CPU (default: every core this process may use). Ray
            sets one thread per logical CPU an actor asks for; on a CPU host the model is the
            bottleneck and reads and post-processing leave cores idle between its batches.
    """

    def __init__(
        self,
        checkpoint: str,
        *,
        device: str = "auto",
        tta: bool = False,
        threads: int | None = None,
    ) -> None:
        self.device = choose_device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        model, self.card = load_checkpoint(checkpoint, device=self.device)
        self.model = model.to(memory_format=torch.channels_last)
        self.tta = tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        images = batch.pop("image")
        batch["probs"] = quantize(self.predict(images))
        batch["forward_s"] = np.full(len(images), (time.perf_counter() - start) / len(images))
        return batch

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 → ``(B, K, H, W)`` float32 probabilities."""
        # Ray Data may hand over read-only views (its Arrow blocks); torch wants its own memory.
        writable = images.flags.writeable and images.flags.c_contiguous
        x = torch.from_numpy(images if writable else np.array(images)).to(self.device)
        probs = self._probabilities(x)
        if self.tta:  # x is (B, H, W, 3); probabilities are (B, K, H, W)
            probs = probs + self._probabilities(x.flip(2)).flip(-1)
            probs = (probs + self._probabilities(x.flip(1)).flip(-2)) / 3
        return probs.cpu().numpy()

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        autocast = self.device.type == "cuda"
        logits = forward(self.model, x, self.card.normalization, autocast=autocast)
        return probabilities(logits, self.card.target_mode)
