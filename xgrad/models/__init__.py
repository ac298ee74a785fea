"""Networks, one file per family; configs build them by class path (``conf/model/*.yaml``).

Image models take ``in_channels``, ``num_classes`` and ``image_size`` from the
data config, so any image model runs on any image dataset.
"""
