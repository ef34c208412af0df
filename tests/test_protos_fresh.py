"""The committed generated protobuf modules are exactly what `python -m qwenpd.protos.generate` produces now."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenpd.protos import generate as gen

pytest.importorskip("grpc_tools")
pytest.importorskip("mypy_protobuf")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    written = gen.generate(tmp_path)
    assert written, "protoc produced nothing"
    fresh = {p.name: p.read_bytes() for p in written}
    package = gen.PROTO_ROOT / gen.PACKAGE_DIR
    committed = {p.name: p.read_bytes() for p in package.iterdir()
                 if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name}
    assert sorted(committed) == sorted(fresh), "generated file set differs: run `python -m qwenpd.protos.generate`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    if stale:
        old_lines, new_lines = committed[stale[0]].splitlines(), fresh[stale[0]].splitlines()
        first = next((i for i, (a, b) in enumerate(zip(old_lines, new_lines)) if a != b),
                     min(len(old_lines), len(new_lines)))
        pytest.fail(f"stale generated files {stale}: run `python -m qwenpd.protos.generate` (a different grpcio-tools or "
                    f"mypy-protobuf version also changes the output). First difference in {stale[0]}, line "
                    f"{first + 1}:\n  committed: {old_lines[first:first + 1]}\n  fresh:     {new_lines[first:first + 1]}")


def test_generated_modules_import_as_package() -> None:
    from qwenpd.protos.qwenpd.v1 import cache_store_pb2_grpc, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

    assert prefill_pb2.DESCRIPTOR.package == "qwenpd.v1"
    assert decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name == "qwenpd.v1.DecodeService"
    for module in (prefill_pb2_grpc, decode_pb2_grpc, cache_store_pb2_grpc):
        assert module.__name__.startswith("qwenpd.protos.qwenpd.v1.")


def _descriptor_set(tmp_path: Path):
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    args = ["grpc_tools.protoc", f"-I{gen.PROTO_ROOT}", f"-I{gen._grpc_tools_include()}", "--include_source_info",
            f"--descriptor_set_out={out}", *[str(p.relative_to(gen.PROTO_ROOT)) for p in gen.proto_files()]]
    assert protoc.main(args) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _camel_to_upper_snake(name: str) -> str:
    return "".join(("_" + c if c.isupper() and i else c) for i, c in enumerate(name)).upper()


def test_every_rpc_message_field_and_enum_value_is_commented(tmp_path: Path) -> None:
    # descriptor.proto field numbers of the paths we check
    message_type, field, nested, enum_type, value, service, method = 4, 2, 3, 5, 2, 6, 2
    missing = []
    for file in _descriptor_set(tmp_path).file:
        assert file.package == "qwenpd.v1"
        commented = {tuple(loc.path) for loc in file.source_code_info.location
                     if loc.leading_comments.strip() or loc.trailing_comments.strip()}

        def check(path: tuple[int, ...], what: str) -> None:
            if path not in commented:
                missing.append(f"{file.name}: {what}")

        def walk_message(msg, path):
            check(path, msg.name)
            for i, f in enumerate(msg.field):
                check(path + (field, i), f"{msg.name}.{f.name}")
            for i, sub in enumerate(msg.nested_type):
                if not sub.options.map_entry:
                    walk_message(sub, path + (nested, i))

        for i, msg in enumerate(file.message_type):
            walk_message(msg, (message_type, i))
        for i, enum in enumerate(file.enum_type):
            check((enum_type, i), enum.name)
            prefix = _camel_to_upper_snake(enum.name) + "_"
            assert enum.value[0].number == 0 and enum.value[0].name == prefix + "UNSPECIFIED", enum.name
            for j, v in enumerate(enum.value):
                assert v.name.startswith(prefix), v.name
                check((enum_type, i, value, j), v.name)
        for i, svc in enumerate(file.service):
            check((service, i), svc.name)
            for j, m in enumerate(svc.method):
                check((service, i, method, j), f"{svc.name}.{m.name}")
    assert not missing, "uncommented: " + ", ".join(missing)


def test_durations_end_in_ns(tmp_path: Path) -> None:
    suspicious = []
    for file in _descriptor_set(tmp_path).file:
        for msg in file.message_type:
            for f in msg.field:
                if any(w in f.name for w in ("ttl", "duration", "timeout", "latency")) and not f.name.endswith("_ns"):
                    suspicious.append(f"{msg.name}.{f.name}")
    assert not suspicious


def _comment(tmp_path: Path, message: str, field_name: str) -> str:
    """The leading comment of `message.field_name` in the protos."""
    message_type, field = 4, 2
    for file in _descriptor_set(tmp_path).file:
        for i, msg in enumerate(file.message_type):
            for j, f in enumerate(msg.field):
                if (msg.name, f.name) == (message, field_name):
                    path = [message_type, i, field, j]
                    return next(loc.leading_comments for loc in file.source_code_info.location if loc.path == path)
    raise KeyError(f"{message}.{field_name}")


def test_refused_values_of_wide_fields_are_documented(tmp_path: Path) -> None:
    """A uint64 seed is refused from 2^63 (SamplingParams checks it), and the proto says so."""
    from qwenpd.engine.sampling import SamplingParams

    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**63)
    assert "[0, 2^63)" in _comment(tmp_path, "SamplingParams", "seed")
    assert "INVALID_ARGUMENT" in _comment(tmp_path, "SharedEntry", "prefix_key")
    assert "INVALID_ARGUMENT" in _comment(tmp_path, "PrefillRequest", "resume_generated")
