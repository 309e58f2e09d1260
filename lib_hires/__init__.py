"""Engine of the high-resolution extension: pure torch, importable without the WebUI."""
