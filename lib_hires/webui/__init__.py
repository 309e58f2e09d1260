"""Adapters between the engines and AUTOMATIC1111 WebUI v1.10.1 (the only part that imports ``modules``)."""
