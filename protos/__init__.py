"""The gRPC contract: protos/qwenpd/v1/*.proto (proto package `qwenpd.v1`) and the Python code generated from
them, imported as `qwenpd.protos.qwenpd.v1.<name>_pb2`. Regenerate with `python -m qwenpd.protos.generate`;
never edit the generated files by hand (tests/test_protos_fresh.py checks they are fresh)."""

from qwenpd.layout import subpackage_only

subpackage_only(__name__)  # never a top-level package (qwenpd/layout.py)
