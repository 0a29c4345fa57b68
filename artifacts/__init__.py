"""The contract between training and serving: the artifact format, the model store, tokenizers, calibration,
anomaly score definitions and reference models. Depends only on genserve.models."""
