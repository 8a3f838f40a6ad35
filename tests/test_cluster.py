"""Cluster launcher configs: offline validation, and `ray up` of a real one-node cluster.

The integration test runs sshd on a free loopback port with its own config, host key and
client key, `ray up` a generated local-provider config through it (the node's HOME is a
temporary directory, so the launcher's files land there), submits a tiny federation
with `ray job submit` and checks its result, then stops exactly the processes it started.
It never calls `ray stop` or `ray down`: they end every Ray process of the user.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from hfedmoe.cluster import (
    add_cluster_commands,
    check_cluster_config,
    validate_cluster_config,
)
from hfedmoe.platform.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLUSTER = REPO / "cluster.yaml"
LOCAL = REPO / "cluster-local.yaml"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def edited(tmp_path: Path, source: Path, edit) -> Path:
    """A copy of `source` changed by `edit(raw)`."""
    raw = yaml.safe_load(source.read_text())
    edit(raw)
    return write_yaml(tmp_path / source.name, raw)


def experiment(tmp_path: Path, name: str = "exp.yaml", **sections) -> Path:
    raw = {"name": "exp", **sections}
    return write_yaml(tmp_path / name, raw)


def assert_one_problem(problems: list[str], *needles: str) -> None:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}: {problems}"


# The shipped configs ------------------------------------------------------------------


@pytest.mark.parametrize("path", [CLUSTER, LOCAL], ids=lambda p: p.name)
def test_shipped_configs_are_valid(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # file_mounts syncs ".", relative to where `ray up` runs
    cuda = experiment(
        tmp_path,
        runtime={"device": "cuda", "address": "auto"},
        tracking={"uri": "http://127.0.0.1:5000"},
    )
    configs = [REPO / "configs" / "default.yaml", cuda]
    report = check_cluster_config(path, configs)
    assert report.problems == []
    assert report.config is not None


def test_aws_config_declares_what_the_checks_read():
    report = check_cluster_config(CLUSTER)
    types = {t.name: t for t in report.node_types}
    assert types["head"].head and types["head"].resources == {"CPU": 8.0}
    gpu = [t for t in types.values() if t.resources.get("GPU", 0) > 0]
    assert gpu and all(not t.head for t in gpu)
    assert sum(t.min_workers for t in gpu) >= 1  # a GPU is up when a run starts


def test_local_config_is_prepared_by_ray(tmp_path):
    report = check_cluster_config(LOCAL)
    (node,) = report.node_types  # Ray makes one node type of head_ip and worker_ips
    assert (node.min_workers, node.max_workers) == (2, 2)
    assert report.config["provider"]["head_ip"] == "10.0.0.10"


# Broken configs -----------------------------------------------------------------------


def test_misspelled_top_level_key_is_rejected_by_rays_schema(tmp_path):
    path = edited(
        tmp_path, CLUSTER, lambda raw: raw.update(setup_comands=raw.pop("setup_commands"))
    )
    problems = validate_cluster_config(path)
    assert_one_problem(problems, "setup_comands", "did you mean `setup_commands`", "schema")


def test_misspelled_node_type_key_is_rejected(tmp_path):
    def edit(raw):
        raw["available_node_types"]["gpu_1x"]["min_worker"] = 1

    problems = validate_cluster_config(edited(tmp_path, CLUSTER, edit))
    assert_one_problem(problems, "available_node_types.gpu_1x", "min_worker", "min_workers")


def test_misspelled_provider_key_is_rejected(tmp_path):
    # Ray's schema lets any provider key through; the region would silently be unset.
    def edit(raw):
        raw["provider"]["regoin"] = raw["provider"].pop("region")

    problems = validate_cluster_config(edited(tmp_path, CLUSTER, edit))
    assert_one_problem(problems, "provider.regoin", "did you mean `region`")
    assert_one_problem(problems, "provider.region: missing")


@pytest.mark.parametrize(
    ("source", "field", "needle"),
    [
        (CLUSTER, "region", "provider.region: missing"),
        (LOCAL, "head_ip", "provider.head_ip: missing"),
        (LOCAL, "worker_ips", "provider.worker_ips: missing"),
        (CLUSTER, "type", "provider: missing, or without `type`"),
    ],
)
def test_missing_provider_field_is_rejected(tmp_path, source, field, needle):
    path = edited(tmp_path, source, lambda raw: raw["provider"].pop(field))
    assert_one_problem(validate_cluster_config(path), needle)


def test_node_type_without_required_field_is_rejected(tmp_path):
    path = edited(
        tmp_path, CLUSTER, lambda raw: raw["available_node_types"]["head"].pop("node_config")
    )
    assert_one_problem(validate_cluster_config(path), "node_config", "required")


def test_setup_that_does_not_install_the_project_is_rejected(tmp_path):
    def edit(raw):
        raw["setup_commands"] = ["pip install 'ray[default]==2.60.0' torch"]

    problems = validate_cluster_config(edited(tmp_path, CLUSTER, edit))
    assert_one_problem(problems, "head_setup_commands", "nothing installs hfedmoe")
    assert_one_problem(problems, "`gpu_1x`", "nothing installs hfedmoe")


def test_node_type_that_overrides_the_setup_must_install_too(tmp_path):
    def edit(raw):
        raw["available_node_types"]["gpu_4x"]["worker_setup_commands"] = ["nvidia-smi"]

    problems = validate_cluster_config(edited(tmp_path, CLUSTER, edit))
    assert_one_problem(problems, "`gpu_4x`", "nothing installs hfedmoe")
    assert not [p for p in problems if "`gpu_1x`" in p]


def test_project_directory_must_reach_the_nodes(tmp_path):
    path = edited(tmp_path, CLUSTER, lambda raw: raw["file_mounts"].pop("~/hfedmoe"))
    assert_one_problem(validate_cluster_config(path), "installs from ~/hfedmoe", "file_mounts")

    def clone(raw):
        raw["file_mounts"].pop("~/hfedmoe")
        raw["setup_commands"].insert(0, "git clone https://example.org/hfedmoe.git ~/hfedmoe")

    assert validate_cluster_config(edited(tmp_path, CLUSTER, clone)) == []


def test_ray_must_start_from_the_installed_venv(tmp_path):
    def edit(raw):
        raw["worker_start_ray_commands"] = [
            "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379"
        ]

    problems = validate_cluster_config(edited(tmp_path, CLUSTER, edit))
    assert_one_problem(problems, "~/hfedmoe/.venv/bin/ray")


def test_workers_without_auth_mode_are_rejected(tmp_path):
    def edit(raw):
        raw["worker_start_ray_commands"] = [
            c.replace("RAY_AUTH_MODE=token ", "") for c in raw["worker_start_ray_commands"]
        ]

    problems = validate_cluster_config(edited(tmp_path, CLUSTER, edit))
    assert_one_problem(problems, "worker_start_ray_commands", "without RAY_AUTH_MODE")


def test_token_auth_needs_the_token_on_the_nodes(tmp_path):
    path = edited(tmp_path, CLUSTER, lambda raw: raw["file_mounts"].pop("~/.ray/auth_token"))
    assert_one_problem(validate_cluster_config(path), "no token on the nodes")


def test_auth_disabled_deliberately_is_accepted(tmp_path):
    def edit(raw):
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            raw[key] = [
                c.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled") for c in raw[key]
            ]
        raw["file_mounts"].pop("~/.ray/auth_token")

    assert validate_cluster_config(edited(tmp_path, CLUSTER, edit)) == []


def test_aws_head_needs_boto3(tmp_path):
    path = edited(tmp_path, CLUSTER, lambda raw: raw.update(head_setup_commands=[]))
    assert_one_problem(validate_cluster_config(path), "boto3")


# What the experiment and sweep configs ask for ---------------------------------------


def test_cuda_runs_need_a_gpu_up_when_they_start(tmp_path):
    cuda = experiment(tmp_path, runtime={"device": "cuda", "address": "auto"})

    def no_min(raw):
        raw["available_node_types"]["gpu_1x"]["min_workers"] = 0

    problems = validate_cluster_config(edited(tmp_path, CLUSTER, no_min), [cuda])
    assert_one_problem(problems, str(cuda), "no GPU is up", "min_workers >= 1")

    def no_gpus(raw):
        for name in ("gpu_1x", "gpu_4x"):
            raw["available_node_types"][name]["resources"].pop("GPU")

    problems = validate_cluster_config(edited(tmp_path, CLUSTER, no_gpus), [cuda])
    assert_one_problem(problems, "no node type declares GPUs")


def test_sweeps_need_cpus_for_their_drivers(tmp_path):
    base = experiment(tmp_path, "base.yaml", runtime={"device": "cuda", "address": "auto"})
    sweep = write_yaml(
        tmp_path / "sweep.yaml",
        {"name": "s", "base": base.name, "search": {"hfedmoe.tau": {"grid": [0.1, 0.2]}}},
    )

    def no_cpus(raw):
        for node in raw["available_node_types"].values():
            node["resources"].pop("CPU")

    problems = validate_cluster_config(edited(tmp_path, CLUSTER, no_cpus), [sweep])
    assert_one_problem(problems, "sweep.yaml", "no CPU is up", "drivers")
    assert validate_cluster_config(CLUSTER, [sweep]) == []


def test_sweep_overrides_are_applied(tmp_path):
    base = experiment(tmp_path, "base.yaml", runtime={"device": "cpu", "address": "auto"})
    sweep = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "name": "s",
            "base": base.name,
            "overrides": {"runtime.device": "cuda"},
            "search": {"hfedmoe.tau": {"grid": [0.1]}},
        },
    )
    path = edited(tmp_path, CLUSTER, lambda raw: raw["available_node_types"].pop("gpu_4x"))

    def no_min(raw):
        raw["available_node_types"]["gpu_1x"]["min_workers"] = 0

    assert validate_cluster_config(path, [sweep]) == []
    problems = validate_cluster_config(edited(tmp_path, path, no_min), [sweep])
    assert_one_problem(problems, "no GPU is up")


def test_tracking_uri_needs_the_mlflow_server_on_the_head(tmp_path):
    run = experiment(
        tmp_path, tracking={"uri": "http://127.0.0.1:5001"}, runtime={"address": "auto"}
    )
    assert_one_problem(validate_cluster_config(CLUSTER, [run]), "no MLflow server on port 5001")


def test_unset_address_is_a_warning_only(tmp_path):
    run = experiment(tmp_path)
    report = check_cluster_config(CLUSTER, [run])
    assert report.problems == []
    assert any("runtime.address unset" in w for w in report.warnings)


def test_bad_experiment_config_is_a_config_error(tmp_path):
    bad = experiment(tmp_path, runtime={"device": "tpu"})
    with pytest.raises(ConfigError, match="--for"):
        validate_cluster_config(CLUSTER, [bad])


# Command line -------------------------------------------------------------------------


def cluster_cli(argv: list[str]) -> int:
    """`hfedmoe cluster ...` on a parser built as cli.py builds it."""
    parser = argparse.ArgumentParser(prog="hfedmoe")
    add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_validates_the_default_file(tmp_path, monkeypatch, capsys):
    shutil.copy(CLUSTER, tmp_path / "cluster.yaml")
    monkeypatch.chdir(tmp_path)
    assert cluster_cli(["cluster", "validate"]) == 0
    out = capsys.readouterr().out
    assert "provider aws" in out and "workers gpu_1x (CPU 16, GPU 1) x1-4" in out
    assert out.rstrip().endswith("cluster.yaml: ok")


def test_cli_reports_problems_with_exit_code_1(tmp_path, capsys):
    path = edited(tmp_path, CLUSTER, lambda raw: raw.update(setup_comands=[]))
    run = experiment(tmp_path, runtime={"address": "auto"})
    assert cluster_cli(["cluster", "validate", str(path), "--for", str(run)]) == 1
    out = capsys.readouterr().out
    assert "problem: (top level): unknown key `setup_comands`" in out
    assert "1 problem(s)" in out


def test_cli_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cluster config not found"):
        cluster_cli(["cluster", "validate", str(tmp_path / "nope.yaml")])


def test_hfedmoe_cli_exposes_cluster_validate(capsys):
    from hfedmoe import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "cluster" in commands.choices
    assert cli.main(["cluster", "validate", "/nonexistent/cluster.yaml"]) == 2
    assert "hfedmoe: cluster config not found" in capsys.readouterr().err


# A real cluster on 127.0.0.1 ----------------------------------------------------------

# ssh has no port option in Ray's launcher (only auth.ssh_proxy_command), so ssh reaches
# the sshd on its free port through this relay.
TCP_RELAY = """\
import os, socket, sys, threading
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def upstream():
    while data := os.read(0, 65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := sock.recv(65536):
    os.write(1, data)
"""

TINY_JOB = {
    "name": "tiny-cluster",
    "seed": 11,
    "threads": 1,
    "data": {"max_length": 24, "max_test_samples": 40},
    "model": {
        "kind": "qwen3_moe",
        "num_experts": 4,
        "top_k": 2,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_layers": 2,
    },
    "federation": {
        "rounds": 2,
        "num_clients": 8,
        "clients_per_round": 4,
        "max_local_steps": 2,
        "batch_size": 4,
        "lr": 1e-3,
    },
    "hfedmoe": {"tau": 0.2},
    "budgets": {
        "distribution": "tiers",
        "tiers": [
            {"name": "slow", "proportion": 0.5, "memory_fraction": 1.5, "flops_per_s": 1e11},
            {"name": "fast", "proportion": 0.5, "memory_fraction": 1.5, "flops_per_s": 1e12},
        ],
    },
    # The job joins the cluster it runs on (ray job submit also sets RAY_ADDRESS).
    "runtime": {"address": "auto", "device": "cpu", "client_timeout_s": 120},
}

# Every port the test's Ray head, MLflow server and sshd listen on: none of them may meet
# the session's Ray instance (which runs beside them in the same pytest process).
PORT_NAMES = (
    "gcs",
    "dashboard",
    "agent_listen",
    "agent_grpc",
    "runtime_env",
    "metrics",
    "client_server",
    "node_manager",
    "object_manager",
    "mlflow",
    "sshd",
)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (from the kernel's ephemeral range)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_range(size: int) -> tuple[int, int]:
    """A block of free ports below the ephemeral range and above Ray's default worker
    ports (10002-19999, which the session's Ray uses)."""
    for _ in range(50):
        low = secrets.randbelow(9000) + 20000
        block = range(low, low + size)
        try:
            with contextlib.ExitStack() as stack:
                for port in block:
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return low, low + size - 1
        except OSError:
            continue
    raise RuntimeError("no free block of ports for Ray's workers")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray's variables (the session's Ray sets some)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


def find_sshd() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("sshd", path=path)


class LoopbackCluster:
    """sshd on a free loopback port and a one-node Ray cluster `ray up` starts through it.

    Everything lives under `root` (short: Ray's socket paths must fit 107 bytes): keys,
    sshd's config, the node's HOME, Ray's --temp-dir, RAY_TMPDIR and TMPDIR of `ray up`.
    """

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.token = root / "auth_token"
        ports = free_ports(len(PORT_NAMES))
        self.port = dict(zip(PORT_NAMES, ports, strict=True))
        self.worker_ports = free_port_range(200)
        self.cluster_name = f"hfedmoe-ci-{secrets.token_hex(4)}"
        self.config = root / "cluster.yaml"
        self.sshd: subprocess.Popen | None = None
        self.created_privsep = False

    # sshd

    def start_sshd(self) -> None:
        sshd = find_sshd()
        missing = [t for t, p in (("sshd", sshd), ("ssh", shutil.which("ssh"))) if not p]
        missing += [t for t in ("ssh-keygen", "rsync") if not shutil.which(t)]
        if missing:
            pytest.skip(
                f"{', '.join(missing)} not installed (apt-get install openssh-server rsync)"
            )
        for key in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / key)],
                check=True,
            )
        shutil.copy(self.root / "client_key.pub", self.root / "authorized_keys")
        self.home.mkdir()
        (self.home / ".bashrc").write_text("")  # Ray's ssh commands `source ~/.bashrc`
        (self.root / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\n"
            f"Port {self.port['sshd']}\n"
            f"HostKey {self.root / 'host_key'}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "StrictModes no\n"
            "UsePAM no\n"
            # The node's home: ~/ray_bootstrap_config.yaml, ~/.ray/auth_token land here.
            f"SetEnv HOME={self.home}\n"
        )
        privsep = Path("/run/sshd")  # sshd insists on its privilege separation directory
        if os.geteuid() == 0 and not privsep.exists():
            privsep.mkdir(mode=0o755, parents=True)
            self.created_privsep = True
        log = open(self.root / "sshd.log", "w")  # noqa: SIM115 (closed with the process)
        self.sshd = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(self.root / "sshd_config")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self._wait_for_ssh()

    def ssh_options(self) -> list[str]:
        return [
            "-i", str(self.root / "client_key"),
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={os.devnull}",
            "-o", f"ProxyCommand={self.proxy_command()}",
        ]  # fmt: skip

    def proxy_command(self) -> str:
        relay = self.root / "tcp_relay.py"
        if not relay.exists():
            relay.write_text(TCP_RELAY)
        return f"{sys.executable} {relay} 127.0.0.1 {self.port['sshd']}"

    def _wait_for_ssh(self) -> None:
        """Wait for sshd to listen (or to exit), then log in once; skip with the reason."""
        log = self.root / "sshd.log"
        deadline = time.monotonic() + 20
        while self.sshd.poll() is None and "Server listening" not in log.read_text():
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if self.sshd.poll() is not None or "Server listening" not in log.read_text():
            pytest.skip(f"sshd cannot run here: {log.read_text().strip() or 'it does not listen'}")
        login = [
            "ssh",
            *self.ssh_options(),
            "-o",
            "BatchMode=yes",
            f"{getpass.getuser()}@127.0.0.1",
        ]
        try:
            probe = subprocess.run(
                [*login, "true"],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("ssh to the test's sshd does not answer in 30 s")
        if probe.returncode != 0:
            pytest.skip(
                f"cannot ssh to the test's sshd: {probe.stderr.strip()} / {log.read_text()}"
            )

    # Ray

    def write_config(self) -> Path:
        """A local-provider config in the shape of cluster-local.yaml for this machine:
        the project is installed already (setup checks that), no `ray stop`, own ports."""
        p = self.port
        low, high = self.worker_ports
        start = (
            f"source {VENV_BIN}/activate; export RAY_TMPDIR={self.root / 'rt'}; "
            f"RAY_AUTH_MODE=token ray start --head --node-ip-address=127.0.0.1 "
            f"--port={p['gcs']} --temp-dir={self.root / 'ray'} --num-cpus=2 --num-gpus=0 "
            f"--object-store-memory=200000000 --include-dashboard=true "
            f"--dashboard-host=127.0.0.1 --dashboard-port={p['dashboard']} "
            f"--dashboard-agent-listen-port={p['agent_listen']} "
            f"--dashboard-agent-grpc-port={p['agent_grpc']} "
            f"--runtime-env-agent-port={p['runtime_env']} --metrics-export-port={p['metrics']} "
            f"--ray-client-server-port={p['client_server']} "
            f"--node-manager-port={p['node_manager']} "
            f"--object-manager-port={p['object_manager']} "
            f"--min-worker-port={low} --max-worker-port={high} "
            f"--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats"
        )
        config = {
            "cluster_name": self.cluster_name,
            "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
            "auth": {
                "ssh_user": getpass.getuser(),
                "ssh_private_key": str(self.root / "client_key"),
                "ssh_proxy_command": self.proxy_command(),
            },
            # As in cluster.yaml, from this test's own token rather than the user's.
            "file_mounts": {"~/.ray/auth_token": str(self.token)},
            "initialization_commands": [],
            "setup_commands": [f"{VENV_BIN}/python -c 'import hfedmoe'"],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [
                start,
                f"{REPO}/scripts/mlflow-server --port {p['mlflow']} --dir {self.root / 'mlflow'} "
                "--workers 1",
            ],
            "worker_start_ray_commands": [],
        }
        self.token.write_text(secrets.token_hex(32))
        return write_yaml(self.config, config)

    def ray(self, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
        (self.root / "tmp").mkdir(exist_ok=True)
        return subprocess.run(
            [str(VENV_BIN / "ray"), *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            cwd=self.root,
            # `ray up`'s state file, config cache and temporary files stay under root.
            env=clean_env(RAY_TMPDIR=str(self.root / "rt"), TMPDIR=str(self.root / "tmp"), **env),
        )

    def up(self) -> subprocess.CompletedProcess:
        return self.ray("up", str(self.config), "--yes", "--no-config-cache", timeout=300)

    def submit(self, job: Path, submission_id: str) -> subprocess.CompletedProcess:
        return self.ray(
            "job", "submit",
            "--address", f"http://127.0.0.1:{self.port['dashboard']}",
            "--submission-id", submission_id,
            "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}),
            # As the README submits: `ray job submit` quotes each word (shlex.join), so a
            # shell line goes through bash -c; `hfedmoe` comes from the venv that the
            # start command activated.
            "--", "bash", "-c", f"cd {job.parent} && hfedmoe run {job.name} --no-progress",
            timeout=300,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token),
        )  # fmt: skip

    # Teardown

    def control_dir(self) -> Path:
        """Where Ray's ssh keeps its ControlMaster socket for this cluster (Ray's layout)."""
        user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
        cluster = hashlib.sha256(self.cluster_name.encode()).hexdigest()[:10]
        return Path(f"/tmp/ray_ssh_{user}/{cluster}")

    def markers(self) -> tuple[str, ...]:
        return (str(self.root), str(self.control_dir()))

    def started_processes(self) -> dict[int, psutil.Process]:
        """Processes with our paths in their command line, the process groups they lead
        (Ray's head: everything `ray start` spawned), and all their descendants."""
        spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        own_group = os.getpgid(0)
        found = {p.pid: p for p in processes_mentioning(self.markers())}
        groups = set()
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
        groups -= {own_group, 0, 1}
        for proc in psutil.process_iter():
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if os.getpgid(proc.pid) in groups:
                    found[proc.pid] = proc
        for proc in list(found.values()):
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        return {pid: p for pid, p in found.items() if pid not in spared}

    def teardown(self) -> list[psutil.Process]:
        """Stop exactly what this test started (Ray head, MLflow server, sshd, ssh
        multiplexers, relays), by process id; return what survived."""
        for _ in range(2):  # a second pass catches what was spawned meanwhile
            procs = list(self.started_processes().values())
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(procs, timeout=5)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
        if self.sshd is not None:
            self.sshd.wait(timeout=10)
        shutil.rmtree(self.control_dir(), ignore_errors=True)
        with contextlib.suppress(OSError):
            self.control_dir().parent.rmdir()  # only if no other cluster's socket is there
        if self.created_privsep:
            with contextlib.suppress(OSError):
                Path("/run/sshd").rmdir()
        return list(processes_mentioning(self.markers()))


def processes_mentioning(markers: tuple[str, ...]):
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and any(m in cmdline for m in markers):
            yield proc


def http_status(url: str, wait_s: float = 60) -> int:
    """The HTTP status of a GET, once the server answers (a loaded machine may need a
    while after `ray start` returns before the dashboard listens)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def loopback_cluster():
    root = Path(tempfile.mkdtemp(prefix="hfc-", dir="/tmp"))
    cluster = LoopbackCluster(root)
    try:
        yield cluster
    finally:
        cluster.teardown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_up_local_cluster_runs_a_federation_job(ray_address, loopback_cluster):
    import ray
    from mlflow.tracking import MlflowClient

    cluster = loopback_cluster
    cluster.start_sshd()
    mlflow_uri = f"http://127.0.0.1:{cluster.port['mlflow']}"
    job = write_yaml(
        cluster.root / "tiny.yaml",
        {
            **TINY_JOB,
            "output_dir": str(cluster.root / "runs"),
            "tracking": {"uri": mlflow_uri, "experiment": "cluster-ci"},
        },
    )
    config = cluster.write_config()
    assert validate_cluster_config(config, [job]) == []  # our validator agrees with `ray up`

    up = cluster.up()
    assert up.returncode == 0, f"ray up failed:\n{tail(up.stdout + up.stderr)}"
    # Token auth is on (RAY_AUTH_MODE=token), and the node's token is the mounted one.
    dashboard = f"http://127.0.0.1:{cluster.port['dashboard']}/api/jobs/"
    assert http_status(dashboard) == 401  # no token, refused
    assert (cluster.home / ".ray" / "auth_token").read_text() == cluster.token.read_text()

    submitted = cluster.submit(job, "hfedmoe-ci-job")
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, f"job failed:\n{tail(output, 80)}"
    assert "Job 'hfedmoe-ci-job' succeeded" in output
    assert "done: 2 rounds, final accuracy" in output
    (run_dir,) = (cluster.root / "runs").iterdir()
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "round-00001"
    runs = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("cluster-ci").experiment_id]
    )
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert "accuracy" in runs[0].data.metrics

    survivors = cluster.teardown()
    assert survivors == [], f"still running: {[p.info['cmdline'] for p in survivors]}"
    assert not cluster.control_dir().exists()
    # The session's Ray instance is untouched.
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == ray_address
    assert ray.get(ray.put(1)) == 1
