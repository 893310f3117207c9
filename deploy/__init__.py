"""qcloop.deploy: the deploy plugin (:mod:`.plugin`): ONNX export and the ``onnxruntime``
runtime (:mod:`.onnx`), the HTTP service (:mod:`.serve`), Triton model repositories
(:mod:`.triton`), their commands (:mod:`.commands`) and benchmarks (:mod:`.benchmarks`); the
Dockerfile and the Kubernetes, Prometheus, Alertmanager and Grafana assets beside them."""
