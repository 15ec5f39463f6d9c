"""Compression verbs over a model: analyze -> capture -> prune -> distill -> measure (-> quantize -> plan).

Units are named by block and stream: ``double_blocks.{i}.img``, ``double_blocks.{i}.txt`` and
``single_blocks.{i}``; layer indices count double blocks first, then single blocks (FLUX.1-dev:
0–18 double, 19–56 single), as ``--layers 0-18,30-37`` does.
"""
