"""ONNX: a run's networks exported and checked against PyTorch (:mod:`.export`), the export's
format (:mod:`.manifest`), the parity check (:mod:`.parity`, :mod:`.parity_data`), the graph
conversion (:mod:`.convert`) and the ``onnxruntime`` runtime that runs an export
(:mod:`.runtime`). Everything here needs the ``onnx`` extra."""
