"""Weights: the registry of published files, downloads, reading every checkpoint form, loading
into a model and writing our own files.

- :mod:`~densenet.hub.registry`: the published weights (URL, hash, eval transform, accuracy);
- :mod:`~densenet.hub.download`: hash-checked, cached, resumable downloads;
- :mod:`~densenet.hub.formats`: reading any weights file into a state dict in our key layout;
- :mod:`~densenet.hub.sources`: what ``create_model(pretrained=...)`` points at, and what the
  weights say about the model (architecture, channels, classes, ``pretrained_cfg``);
- :mod:`~densenet.hub.loading`: copying weights into a model, after checking they fit;
- :mod:`~densenet.hub.saving`: writing our safetensors files, and torchvision's state dict.
"""
