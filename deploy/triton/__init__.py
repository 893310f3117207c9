"""Triton Inference Server: a model repository written from a qcloop ONNX export
(:mod:`.repository`), the ``config.pbtxt`` texts it holds (:mod:`.configs`), their validation
against a table of Triton's ``ModelConfig`` (:mod:`.schema`) and the checks of a whole
repository (:mod:`.check`). Needs the ``triton`` extra (and ``onnx`` for the models)."""
