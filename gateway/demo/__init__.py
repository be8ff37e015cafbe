"""The bundled demo: a strict, instrumented token API (:mod:`gateway.demo.api`) and a
single-page app (``gateway/demo/spa/``) that talks to it only through the gateway."""
