"""Image classification: cross-entropy loss, top-1 and top-5 accuracy."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Classification:
    """Batches are ``(images, labels)``; the model returns logits ``[B, classes]``.

    ``evaluate`` returns ``loss`` (mean cross-entropy), ``acc`` (top-1 accuracy
    in percent) and, when there are more than five classes, ``acc5`` (top-5,
    percent). ``acc`` decides which run is better (higher).
    """

    metric = "acc"
    mode = "max"

    def __init__(self, data: Any = None):
        """``data`` (the run's data module) is part of the task interface; classification needs nothing from it."""

    def start_epoch(self, model: nn.Module, training: bool) -> None:
        """Nothing carries over between batches."""

    def train_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        images, labels = batch
        return F.cross_entropy(model(images), labels), labels.numel()

    def evaluate(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        loss_sum = top1 = top5 = 0  # tensors on the device once added to: read once, at the end
        count, classes = 0, 0
        for images, labels in batches:
            logits = model(images).float()
            loss_sum = loss_sum + F.cross_entropy(logits, labels, reduction="sum").double()
            classes = logits.shape[1]
            ranked = logits.topk(min(5, classes), dim=1).indices
            hits = ranked == labels[:, None]
            top1, top5 = top1 + hits[:, 0].sum(), top5 + hits.any(dim=1).sum()
            count += labels.numel()
        if count == 0:
            raise ValueError("evaluation got no batches")
        loss_sum, top1, top5 = torch.stack([loss_sum, top1.double(), top5.double()]).tolist()  # the one read
        metrics = {"loss": loss_sum / count, "acc": 100 * top1 / count, "size": count}
        if classes > 5:
            metrics["acc5"] = 100 * top5 / count
        return metrics
