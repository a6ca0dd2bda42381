"""Java offline: buf.gen.local.yaml's Java plugins (protoc's built-in java and
Debian's grpc_java_plugin as protoc-gen-grpc-java) generate the stubs, javac
compiles them and clients/java's Ask (the README's Java snippet) against
Debian's grpc-java and protobuf-java jars, and Ask asks the live gateway."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.processes import REPO, Supervisor

JARS = Path("/usr/share/java")
BUF = REPO / "node_modules" / ".bin" / "buf"
# What the stubs and a netty client need at compile and run time (Debian packages
# in the Makefile's system-deps).
CLASSPATH = [
    JARS / f"{name}.jar"
    for name in (
        "protobuf",
        "grpc-api",
        "grpc-stub",
        "grpc-protobuf",
        "grpc-protobuf-lite",
        "grpc-context",
        "grpc-core",
        "grpc-netty",
        "guava",
        "geronimo-annotation-1.3-spec",
        "jsr305",
        "perfmark-api",
        "netty-common",
        "netty-buffer",
        "netty-transport",
        "netty-codec",
        "netty-codec-http",
        "netty-codec-http2",
        "netty-handler",
        "netty-resolver",
        "netty-codec-socks",
        "netty-handler-proxy",
    )
]
missing = [tool for tool in ("javac", "java", "grpc_java_plugin") if shutil.which(tool) is None]
missing += [str(jar) for jar in CLASSPATH if not jar.exists()]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"not installed: {', '.join(missing)} (make system-deps)"
)


def test_java_client_built_offline_asks_the_gateway(system: Supervisor, tmp_path: Path) -> None:
    if not BUF.exists():
        pytest.skip("buf is not installed (make node_modules/.bin/buf)")
    # Debian names the plugin grpc_java_plugin; buf looks for protoc-gen-grpc-java.
    plugins = tmp_path / "bin"
    plugins.mkdir()
    (plugins / "protoc-gen-grpc-java").symlink_to(shutil.which("grpc_java_plugin") or "")
    generated = tmp_path / "gen"
    template = yaml.safe_load((REPO / "buf.gen.local.yaml").read_text())
    template["plugins"] = [
        {**plugin, "out": str(generated)}
        for plugin in template["plugins"]
        if "java" in str(plugin.get("local", "")) + str(plugin.get("protoc_builtin", ""))
    ]
    assert len(template["plugins"]) == 2, "buf.gen.local.yaml lost its Java plugins"
    (tmp_path / "buf.gen.java.yaml").write_text(yaml.safe_dump(template))
    env = {**os.environ, "PATH": f"{plugins}:{os.environ['PATH']}"}
    made = subprocess.run(
        [str(BUF), "generate", "--template", str(tmp_path / "buf.gen.java.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    sources = [str(p) for p in generated.rglob("*.java")]
    assert any(p.endswith("TalkerServiceGrpc.java") for p in sources)
    sources += [str(p) for p in (REPO / "clients" / "java" / "src").rglob("*.java")]
    classes = tmp_path / "classes"
    classpath = ":".join(map(str, CLASSPATH))
    compiled = subprocess.run(
        ["javac", "-nowarn", "-d", str(classes), "-cp", classpath, *sources],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    run_classpath = f"{classes}:{classpath}"
    asked = subprocess.run(
        [
            "java",
            "-cp",
            run_classpath,
            "com.talker.examples.Ask",
            system.addresses["gateway"],
            "java-client-1",
            "What is the capital of France?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert asked.returncode == 0, asked.stdout + asked.stderr
    lines = dict(line.split(": ", 1) for line in asked.stdout.splitlines() if ": " in line)
    assert lines.get("trace id") == "java-client-1", asked.stdout
    assert lines.get("reply text", "").strip(), asked.stdout
    refused = subprocess.run(
        ["java", "-cp", run_classpath, "com.talker.examples.Ask", "127.0.0.1:1", "t", "Hello?"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and refused.stderr.startswith("ask: UNAVAILABLE"), refused.stderr
