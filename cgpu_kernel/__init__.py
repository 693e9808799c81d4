"""cgpu-kernel: a Jupyter kernel that proxies every message to a kernel on a remote Jupyter server.

Pick the "Colab GPU" (or any cgpu) kernelspec in JupyterLab, VS Code, ``jupyter console``,
nbclient or papermill; the process that starts binds the usual five ZMQ sockets and relays
everything, over WebSocket, to the remote kernel. See ``docs/design.md`` for the layout.
"""

__version__ = "0.1.0"
