"""CacheStoreConfig validation and its command-line flags."""

from __future__ import annotations

import argparse

import pytest

from qwenpd.cache_store.config import CacheStoreConfig, add_args, build_parser, config_from_args, parse_bytes


def test_flags_build_a_config() -> None:
    args = build_parser().parse_args(["--listen", "[::1]:0", "--budget", "8GiB", "--lease-ttl", "30",
                                      "--store-id", "a_1", "--segment-size", "0"])
    config = config_from_args(args)
    assert config.budget_bytes == 8 << 30 and config.lease_ttl_s == 30 and config.segment_bytes == 0
    assert (config.host, config.port) == ("::1", 0)
    assert config_from_args(add_args(argparse.ArgumentParser()).parse_args([])) == CacheStoreConfig()


@pytest.mark.parametrize("text,value", [("1048576", 1 << 20), ("512MiB", 512 << 20), ("2g", 2 << 30),
                                        ("1.5GB", 1_500_000_000), ("4_096", 4096)])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("kw", [dict(listen="nohost"), dict(listen="h:99999"), dict(budget_bytes=0),
                                dict(lease_ttl_s=0), dict(allocation_ttl_s=-1), dict(store_id="Has-Dash"),
                                dict(shm_dir="/no/such/dir"), dict(segment_bytes=1000), dict(grace_s=-1)],
                         ids=lambda kw: next(iter(kw)))
def test_invalid_configs_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kw)).split("_bytes")[0].split("_s")[0]):
        CacheStoreConfig(**kw)


def test_bad_byte_sizes_are_argparse_errors() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")
