"""Go offline: buf.gen.local.yaml's Go plugins (Debian's protoc-gen-go and
protoc-gen-go-grpc) generate the stubs, Go builds clients/go/ask against
Debian's gRPC-Go and protobuf sources in GOPATH mode (no network), and the
binary asks the live gateway a question."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.processes import REPO, Supervisor

GOCODE = Path("/usr/share/gocode")
BUF = REPO / "node_modules" / ".bin" / "buf"
missing = [
    tool for tool in ("go", "protoc-gen-go", "protoc-gen-go-grpc") if shutil.which(tool) is None
] + [f"{GOCODE}/src/{lib}" for lib in ("google.golang.org/grpc", "google.golang.org/protobuf")
     if not (GOCODE / "src" / lib).is_dir()]  # fmt: skip
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"not installed: {', '.join(missing)} (make system-deps)"
)


def test_go_client_built_offline_asks_the_gateway(system: Supervisor, tmp_path: Path) -> None:
    if not BUF.exists():
        pytest.skip("buf is not installed (make node_modules/.bin/buf)")
    gopath = tmp_path / "gopath"
    module = gopath / "src" / "example.com" / "talker"
    # The documented template, Go plugins only, written into a GOPATH.
    template = yaml.safe_load((REPO / "buf.gen.local.yaml").read_text())
    template["plugins"] = [
        {**plugin, "out": str(module / "gen" / "go")}
        for plugin in template["plugins"]
        if str(plugin.get("local", "")).startswith("protoc-gen-go")
    ]
    assert len(template["plugins"]) == 2, "buf.gen.local.yaml lost its Go plugins"
    (tmp_path / "buf.gen.go.yaml").write_text(yaml.safe_dump(template))
    generated = subprocess.run(
        [str(BUF), "generate", "--template", str(tmp_path / "buf.gen.go.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stderr
    assert (module / "gen" / "go" / "talker" / "v1" / "talker_grpc.pb.go").exists()
    shutil.copytree(REPO / "clients" / "go", module / "clients" / "go")
    offline = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}:{GOCODE}",
        "GOCACHE": str(tmp_path / "gocache"),
        "GOFLAGS": "",
        "GOPROXY": "off",  # a build that wanted the network would fail here
    }
    binary = tmp_path / "ask"
    built = subprocess.run(
        ["go", "build", "-o", str(binary), "example.com/talker/clients/go/ask"],
        env=offline,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    asked = subprocess.run(
        [
            str(binary),
            "--address",
            system.addresses["gateway"],
            "--trace-id",
            "go-client-1",
            "What is the capital of France?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert asked.returncode == 0, asked.stdout + asked.stderr
    lines = dict(
        line.split(": ", 1)
        for line in asked.stdout.splitlines()
        if ": " in line and line[0].isalpha()
    )
    assert lines.get("trace id") == "go-client-1", asked.stdout
    assert lines.get("reply text", "").strip(), asked.stdout
    assert "go-client-1" in system.log("gateway")
    # An unreachable gateway is one sentence on stderr and a failed exit, no panic.
    refused = subprocess.run(
        [str(binary), "--address", "127.0.0.1:1", "--timeout", "3s", "Hello?"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and refused.stderr.startswith("ask: "), refused.stderr
    assert "goroutine" not in refused.stderr
