"""Dev tooling of a source checkout, not shipped in the image: the local fleet
(``specmesh up``), the installer of the local services (etcd, OpenBao, Redis, Chromium,
nginx, wrk) and the scripted OpenAI-compatible model server."""
