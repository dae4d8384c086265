"""Shipping a trained model: programs that run without flaxvision (ONNX, StableHLO), an HTTP server, the Hub.

- `program`: a model as a pure function of an image batch (preprocessing optionally inside), with the metadata
  that travels with every exported program (labels, preprocessing, input and output description).
- `onnx_export`, `stablehlo`: that function written as an ONNX model (jax2onnx) or a `jax.export` artifact.
- `server`: `flaxvision serve`, dynamic batching over a few compiled batch sizes.
- `card`, `push`: the model card of a run and `flaxvision push` to the Hugging Face Hub.
"""
