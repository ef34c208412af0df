"""Install the top-level folders (protos/, kernels/, engine/, ...) as subpackages of one namespace, `qwenpd.*`.

The folders stay where they are (the layout is part of the product), but generic names such as `kernels`,
`engine` or `clients` are never installed as top-level packages: they would collide with real PyPI packages.
Everything else about the project lives in pyproject.toml.
"""

from setuptools import find_packages, setup

# Top-level folders that are installed as qwenpd.<folder>.
SUBPACKAGES = ("protos", "kernels", "engine", "cache_store", "encoder_service", "prefill_service", "decode_service",
               "clients", "gateway")

package_dir = {"qwenpd": "qwenpd"}
packages = ["qwenpd", *(f"qwenpd.{p}" for p in find_packages("qwenpd"))]
for folder in SUBPACKAGES:
    package_dir[f"qwenpd.{folder}"] = folder
    packages += [f"qwenpd.{folder}", *(f"qwenpd.{folder}.{p}" for p in find_packages(folder))]

setup(package_dir=package_dir, packages=packages)
