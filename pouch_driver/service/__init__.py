"""The domain's orchestration: networks, endpoints, published ports and addresses, made durable
and kept in step with the kernel. Imports the pure layers, ``store`` and the ``kernel`` ports;
never ``http`` or the composition root."""
