"""Datasets: one file per dataset, each exposing a DataModule class plus ``fetch`` and ``missing``.

The protocol the engine relies on is in :mod:`xgrad.data.base`; in-memory image
datasets share :class:`xgrad.data.images.ImageDataModule`.
"""
