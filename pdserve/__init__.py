"""pdserve: disaggregated LLM serving. This top package owns the command line (``pdserve.cli``), the
launcher of ``pdserve up`` and the user-facing load tools; the layers below it (engine, protos,
kvtransfer, the services, the gateway) never import it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pdserve")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
