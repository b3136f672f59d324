"""The ``specmesh`` command line, one module per command group (``specs``, ``releases``,
``secrets``, ``tokens``, ``audit``, ``mesh``, ``agents``, ``kb``, ``fleet``, ``schema``);
every command on the control plane's state goes through its gRPC API
(:mod:`specmeshctl.client`)."""
