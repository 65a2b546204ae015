"""Throughput and memory benchmark of the study's DenseNets through the project's engine.

``python -m bench`` (or ``make bench``) measures training and inference
patients/s, the data-loading share of an epoch and peak RSS for the 3D and 2D
DenseNet121 at the quick and study input sizes, one subprocess per
configuration; see ``bench.throughput`` for what exactly is timed.
"""
