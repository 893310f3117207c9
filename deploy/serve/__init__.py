"""``qcloop serve``: an HTTP API that segments a NIfTI volume and runs QC on every request.

The app (:func:`qcloop.deploy.serve.app.create_app`, FastAPI, OpenAPI schema at
``/openapi.json``):

=========================  ======  =====================================================
route                      auth    what
=========================  ======  =====================================================
POST /v1/segment           yes     multipart ``file`` (.nii/.nii.gz), ``view``, ``phase``
GET  /v1/masks/{token}     yes     a mask kept for one fetch (``?mask=link``)
GET  /v1/models            yes     versions in use, runtime, execution providers
GET  /healthz              no      liveness
GET  /readyz               no      readiness: models loaded (no detail beyond that)
GET  /metrics              no      added by a metrics exporter plugin (Prometheus)
=========================  ======  =====================================================

Modules: the app factory (:mod:`.app`), its routes (:mod:`.routes`) and response schemas
(:mod:`.schemas`), the API key (:mod:`.auth`), admission control (:mod:`.admission`), the
per-request work (:mod:`.service`), reading the multipart request (:mod:`.form`) and checking
the upload (:mod:`.upload`), the one-time mask store (:mod:`.mask_store`), where models come
from (:mod:`.model_source`) and how they are swapped (:mod:`.model_manager`). The service
speaks to metric exporters only through events (:mod:`qcloop.monitor.core.events`). Everything
here needs the ``serve`` extra.
"""
