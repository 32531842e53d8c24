"""Data pipelines: the Batch contract, readers, transforms, targets, synthetic data and splits."""
from data_pipelines.batch import Batch, collate_samples
from data_pipelines.errors import DataError
from data_pipelines.heatmaps import render_heatmaps, render_heatmaps_numba, render_heatmaps_numpy
from data_pipelines.hip_data import build_hip_data
from data_pipelines.hip_data import load_for_predict as load_labelme_for_predict
from data_pipelines.coco_data import build_coco_data
from data_pipelines.coco_data import load_for_predict as load_coco_for_predict
from data_pipelines.readers.coco_export import dataset_to_coco, export_coco
from data_pipelines.hc18 import build_hc18_data
from data_pipelines.hc18 import load_for_predict as load_hc18_for_predict
from data_pipelines.spine_dataset import build_nifti_data
from data_pipelines.spine_dataset import load_for_predict as load_nifti_for_predict
from data_pipelines.xray_dataset import build_xray_csv_data
from data_pipelines.xray_dataset import load_for_predict as load_xray_for_predict
from data_pipelines.hip_dataset import HipDataset, find_labelme_files
from data_pipelines.readers.labelme import (HIP_CLASS_NAMES, HIP_KPT_NAMES, HIP_LABELS, LabelmeInfo, LabelmeRecord,
                                    polygon_mask, rasterize_polygons, read_labelme, validate_labelme)
from data_pipelines.splits import holdout_split, oversample, read_splits, stratified_group_kfold, write_splits
from data_pipelines.synthetic.hip import (PhantomSample, acute_angle_deg, generate_hip_dataset, graf_angles_deg,
                                      render_phantom)
from data_pipelines.transforms import (AugmentParams, add_speckle_noise, adjust_brightness_contrast, adjust_gamma,
                                       apply_flip_pairs, augment_intensity, gaussian_blur, letterbox_matrix,
                                       points_in_frame, random_affine_matrix, sampling_grid, warp_image, warp_mask,
                                       warp_points)

# data.format -> builder(data_cfg, run_dir, strategy, seed) -> {"train", "val", "test", ...} (task_data.py contract)
READERS = {"labelme": build_hip_data, "xray_csv": build_xray_csv_data, "nifti": build_nifti_data,
           "hc18": build_hc18_data, "coco": build_coco_data}
# data.format -> load_for_predict(path, data_cfg) -> one preprocessed input of `medpose predict`
PREDICT_INPUTS = {"labelme": load_labelme_for_predict, "xray_csv": load_xray_for_predict,
                  "nifti": load_nifti_for_predict, "hc18": load_hc18_for_predict, "coco": load_coco_for_predict}
# data.loader -> the readers it serves (data_pipelines/loaders.py makes the batches); the DALI loader needs the
# reader's dataset.dali_source() (dali_hip.py, dali_xray.py, dali_hc18.py)
DALI_FORMATS = ("labelme", "xray_csv", "hc18")
LOADERS = {"torch": READERS, "dali": {k: v for k, v in READERS.items() if k in DALI_FORMATS}}

__all__ = [
    "LOADERS", "DALI_FORMATS", "READERS", "PREDICT_INPUTS", "build_hip_data", "build_xray_csv_data", "build_nifti_data", "build_hc18_data",
    "build_coco_data", "dataset_to_coco", "export_coco",
    "Batch", "collate_samples", "DataError",
    "render_heatmaps", "render_heatmaps_numba", "render_heatmaps_numpy",
    "HipDataset", "find_labelme_files",
    "HIP_CLASS_NAMES", "HIP_KPT_NAMES", "HIP_LABELS", "LabelmeInfo", "LabelmeRecord", "polygon_mask",
    "rasterize_polygons", "read_labelme", "validate_labelme",
    "holdout_split", "oversample", "read_splits", "stratified_group_kfold", "write_splits",
    "PhantomSample", "acute_angle_deg", "generate_hip_dataset", "graf_angles_deg", "render_phantom",
    "AugmentParams", "add_speckle_noise", "adjust_brightness_contrast", "adjust_gamma", "apply_flip_pairs",
    "augment_intensity", "gaussian_blur", "letterbox_matrix", "points_in_frame", "random_affine_matrix",
    "sampling_grid", "warp_image", "warp_mask", "warp_points",
]
