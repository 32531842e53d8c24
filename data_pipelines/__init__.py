"""Data pipelines: records from readers, one dataset and one augmentation/target path for all of them, the DALI
loader, synthetic data and splits (public API)."""
from data_pipelines.batch import Batch, collate_samples
from data_pipelines.build import build_data, describe_data
from data_pipelines.dataset import LandmarkDataset
from data_pipelines.errors import DataError
from data_pipelines.heatmaps import render_heatmaps, render_heatmaps_numba, render_heatmaps_numpy
from data_pipelines.readers import READERS
from data_pipelines.records import DataInfo, ImageSource, MaskSource, Preprocess, Record
from data_pipelines.splits import holdout_split, oversample, read_splits, stratified_group_kfold, write_splits
from data_pipelines.transforms import (AugmentParams, add_speckle_noise, adjust_brightness_contrast, adjust_gamma,
                                       apply_flip_pairs, augment_intensity, gaussian_blur, letterbox_matrix,
                                       points_in_frame, random_affine_matrix, sampling_grid, warp_image, warp_mask,
                                       warp_points)

# data.loader -> the formats it serves (every reader's dataset serves the DALI loader but the NIfTI one: its
# slabs are z-scored floats, not image files)
DALI_FORMATS = tuple(name for name, reader in READERS.items() if reader.dali)
LOADERS = {"torch": tuple(READERS), "dali": DALI_FORMATS}

__all__ = [
    "Batch", "collate_samples", "build_data", "describe_data", "LandmarkDataset", "DataError", "READERS", "LOADERS",
    "DALI_FORMATS", "DataInfo", "ImageSource", "MaskSource", "Preprocess", "Record",
    "render_heatmaps", "render_heatmaps_numba", "render_heatmaps_numpy",
    "holdout_split", "oversample", "read_splits", "stratified_group_kfold", "write_splits",
    "AugmentParams", "add_speckle_noise", "adjust_brightness_contrast", "adjust_gamma", "apply_flip_pairs",
    "augment_intensity", "gaussian_blur", "letterbox_matrix", "points_in_frame", "random_affine_matrix",
    "sampling_grid", "warp_image", "warp_mask", "warp_points",
]
