"""Stockade: a DICOM archive (PACS) built to be trusted with patient data."""

__version__ = "0.1.0.dev0"
