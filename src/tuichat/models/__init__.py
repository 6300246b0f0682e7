"""Models on disk: finding them in caches, pulling them from a hub, and AWQ quantization with lmdeploy lite."""
