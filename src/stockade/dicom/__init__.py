"""DICOM facts and encodings: UIDs, tables from the standard, bounded parsing, Part 10 files."""
