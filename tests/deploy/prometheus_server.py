"""A real Prometheus (the Debian binary) on loopback with temporary storage, and its HTTP API."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tools import DEPLOY, tool
from tests.support.procs import ManagedProcess, free_port, wait_until

SCRAPE_CONFIG = DEPLOY / "prometheus" / "scrape-config.yaml"


def local_scrape_config(targets: list[str], interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus/scrape-config.yaml with Kubernetes discovery replaced by static
    loopback targets (and its relabelings on Kubernetes metadata dropped, having none to
    act on); job name, path and everything else as shipped. Scraped every `interval`."""
    config: dict[str, Any] = yaml.safe_load(SCRAPE_CONFIG.read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs"), "the shipped job discovers pods"
        job["relabel_configs"] = [
            r for r in job.get("relabel_configs", []) if not _on_kubernetes_metadata(r)
        ]
        job["static_configs"] = [{"targets": targets}]
        job["scrape_interval"] = job["scrape_timeout"] = interval
    return config


def _on_kubernetes_metadata(relabel: dict[str, Any]) -> bool:
    return any(s.startswith("__meta_kubernetes") for s in relabel.get("source_labels", []))


class PrometheusServer:
    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.root = root
        self.port = free_port()
        self.config_path = root / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process = ManagedProcess(
            [
                tool("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            log_path=root / "prometheus.log",
        )

    def start(self) -> PrometheusServer:
        self.process.start()
        self.process.wait_for_port(self.port, timeout=30)
        assert wait_until(self._ready, timeout=30), self.process.log_tail()
        return self

    def stop(self) -> None:
        self.process.stop()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`. Fails on anything but status success."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar", "matrix"), data
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result
