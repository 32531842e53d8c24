"""Readers: one parser per annotation layout, chosen by `data.format` (data_pipelines/readers/base.py: Reader).

Each turns its files into Records + a DataInfo (data_pipelines/records.py); data_pipelines/build.py and dataset.py
do everything else, for every reader alike.
"""
from data_pipelines.readers.base import Reader, ReadResult
from data_pipelines.readers.coco import READER as COCO
from data_pipelines.readers.hc18 import READER as HC18
from data_pipelines.readers.labelme_reader import READER as LABELME
from data_pipelines.readers.nifti_reader import READER as NIFTI
from data_pipelines.readers.table import READER as TABLE
from data_pipelines.readers.xray_csv import XRAY_READER as XRAY_CSV

# data.format -> Reader
READERS: dict[str, Reader] = {r.name: r for r in (COCO, TABLE, LABELME, HC18, XRAY_CSV, NIFTI)}

__all__ = ["READERS", "Reader", "ReadResult"]
