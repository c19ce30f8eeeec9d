"""The one container image every component runs in (built from containers/Dockerfile, target `gpu`,
which also runs on CPU nodes). Bump VERSION with the package version: tests check they agree."""

REGISTRY = "ghcr.io/histotransfer"
VERSION = "0.1.0"
IMAGE = f"{REGISTRY}/histotransfer:{VERSION}-gpu"
