"""The DIMSE adapter: DICOM upper layer (PS3.8) and message exchange (PS3.7) over TCP."""
