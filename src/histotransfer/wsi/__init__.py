"""Whole-slide images: reading (OpenSlide, local or gs://), tissue detection, tiling with QC, and the
sample cohort."""
