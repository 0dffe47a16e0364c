"""The HTTP adapter: DICOMweb (PS3.18) on Starlette, served by uvicorn."""
