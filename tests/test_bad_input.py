"""Bad input, as a new user gives it: one line naming the file or field and the fix, exit 2,
no traceback, and nothing written or lost (no run directory, no MLflow run, earlier runs
untouched)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hfedmoe.cli import main
from hfedmoe.platform.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def fails(capsys, *argv: str) -> str:
    """Run the CLI in this process; assert it refused with one line; return that line.

    (Progress bars of the data loader may come before it; they are no error.)
    """
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("hfedmoe")]
    assert line.startswith("hfedmoe: ") and err.rstrip().endswith(line), err
    return line


def run_csv(tmp_path: Path, capsys, csv_text: str | None, *extra: str) -> str:
    """``hfedmoe run`` of the tiny config on a CSV file; the run directory must not appear."""
    path = tmp_path / "data.csv"
    if csv_text is not None:
        path.write_text(csv_text)
    run_dir = tmp_path / "runs" / "r"
    err = fails(capsys, "run", str(TINY), "--in-process", "--no-progress",
                "--set", "data.source=files", "--set", f"data.path={path}",
                "--run-dir", str(run_dir), *extra)  # fmt: skip
    assert not (tmp_path / "runs").exists()  # neither the run nor the MLflow store beside it
    return err


# --------------------------------------------------------------------------- YAML


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfederation: {rounds: 2\nseed: 1\n")
    err = fails(capsys, "run", str(bad), "--run-dir", str(tmp_path / "r"))
    assert f"{bad} line 3, column 5: not valid YAML" in err
    assert "flow mapping from line 2, column 13" in err  # where the unclosed brace opened
    assert not (tmp_path / "r").exists()
    err = fails(capsys, "run", str(TINY), "--set", "federation.rounds=[1,")
    assert "--set 'federation.rounds=[1,'" in err and "quote it" in err


def test_a_yaml_syntax_error_in_a_sweep_or_its_base_names_that_file(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nbase: base.yaml\nsearch:\n  seed: {grid: [1, 2}\n")
    assert f"{sweep} line 4, column 21: not valid YAML" in fails(capsys, "sweep", str(sweep))
    sweep.write_text("name: s\nbase: base.yaml\nsearch: {seed: {grid: [1, 2]}}\n")
    (tmp_path / "base.yaml").write_text("seed: [1\n")
    assert f"{tmp_path / 'base.yaml'} line 2, column 1" in fails(capsys, "sweep", str(sweep))


# --------------------------------------------------------------------------- sweep files


def write_sweep(tmp_path: Path, **fields) -> Path:
    sweep = {"name": "s", "base": str(TINY), "search": {"seed": {"grid": [1, 2]}}, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_a_sweep_without_a_name_says_to_add_it(tmp_path, capsys):
    path = write_sweep(tmp_path)
    raw = yaml.safe_load(path.read_text())
    del raw["name"]
    path.write_text(yaml.safe_dump(raw))
    err = fails(capsys, "sweep", str(path))
    assert f"{path}: name: missing; add it (the sweep's name" in err


def test_an_unknown_sweep_key_lists_the_allowed_ones(tmp_path, capsys):
    err = fails(capsys, "sweep", str(write_sweep(tmp_path, max_trials=4)))
    assert "max_trials: unknown key; allowed: name, base, overrides, search, num_samples" in err
    # Inside a search dimension the allowed keys are the search kinds.
    err = fails(capsys, "sweep", str(write_sweep(tmp_path, search={"seed": {"gird": [1]}})))
    assert "search.seed.gird: unknown key; allowed: grid, choice, uniform" in err
    assert not (tmp_path / "runs").exists()


def test_config_errors_are_one_line_with_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_config({"federation": {"roundz": 3}, "hfedmoe": {"tau": 1.5}})
    message = str(err.value)
    assert "\n" not in message
    allowed = "allowed: strategy, client_update, server_update, rounds"
    assert f"federation.roundz: unknown key; {allowed}" in message
    assert "hfedmoe.tau: Input should be less than or equal to 1 (got 1.5)" in message
    with pytest.raises(ConfigError, match=r"budgets\.tiers\.0\.name: missing"):
        parse_config({"budgets": {"tiers": [{"proportion": 1.0, "device": "pixel_7"}]}})


def test_a_config_error_names_the_file_it_came_from(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation: {rounds: 0}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: federation\.rounds: Input should be"):
        load_config(path)


# --------------------------------------------------------------------------- data files


def test_a_csv_without_the_text_column_names_data_text_fields_and_its_columns(tmp_path, capsys):
    err = run_csv(tmp_path, capsys, "body,label\nhello world,a\nfoo bar,b\n")
    assert "data.text_fields: field(s) text not found in" in err and "data.csv" in err
    assert "available columns: body, label" in err
    err = run_csv(tmp_path, capsys, "text,kind\nhello world,a\n")
    assert "data.label_field: field(s) label not found" in err


def test_an_empty_csv_is_refused_by_name(tmp_path, capsys):
    assert "data.csv is empty" in run_csv(tmp_path, capsys, "")
    assert "no CSV rows below the header" in run_csv(tmp_path, capsys, "text,label\n\n")


def test_a_csv_too_small_to_split_names_the_split_and_the_clients(tmp_path, capsys):
    # One row: its class keeps it for training, the test split is empty.
    err = run_csv(tmp_path, capsys, "text,label\nhello world,a\n")
    assert "1 row(s) in 1 class(es) leave the test split empty" in err
    assert "data.test_fraction=0.2" in err and "data.path" in err
    # Four rows: 2 train the 8 clients of tiny.yaml cannot share.
    rows = "text,label\na b,x\nc d,y\ne f,x\ng h,y\n"
    err = run_csv(tmp_path, capsys, rows)
    assert "8 clients with at least 1 samples each need 8 samples" in err
    assert "training split has 2" in err and "federation.num_clients" in err


# --------------------------------------------------------------------------- tracking.uri


@pytest.mark.parametrize("uri", ["notaurl", "file:///tmp/mlruns", "ftp://host/x", "http://"])
def test_a_tracking_uri_mlflow_cannot_use_fails_before_anything_starts(tmp_path, capsys, uri):
    err = fails(capsys, "run", str(TINY), "--in-process", "--set", f"tracking.uri={uri}",
                "--run-dir", str(tmp_path / "r"))  # fmt: skip
    assert f"tracking.uri: {uri!r}" in err
    assert "give http(s)://HOST:PORT" in err and "sqlite:///" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "uri", ["http://127.0.0.1:5000", "https://mlflow.example.org/x", "sqlite:///runs/mlflow.db",
            "postgresql+psycopg2://u:p@db/mlflow", "databricks", "databricks://profile"],
)  # fmt: skip
def test_the_tracking_uris_mlflow_takes_are_accepted(uri):
    assert parse_config({"tracking": {"uri": uri}}).tracking.uri == uri


def test_a_sweep_tracking_uri_is_checked_like_a_runs(tmp_path, capsys):
    err = fails(capsys, "sweep", str(write_sweep(tmp_path, tracking_uri="mlruns")))
    assert "tracking_uri: 'mlruns' is a file path" in err


# --------------------------------------------------------------------------- runtime.address


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on: bound, then closed (no traffic leaves here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_address_fails_in_seconds_without_a_traceback(tmp_path):
    """A real `hfedmoe run` (ray.init alone would retry such an address for minutes)."""
    address = f"127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "hfedmoe.cli", "run", str(TINY), "--no-progress",
               "--set", f"runtime.address={address}", "--run-dir", str(tmp_path / "r")]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert time.monotonic() - started < 60  # the interpreter's imports, then one connect
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("hfedmoe:")]
    assert f"runtime.address {address}: no Ray cluster answers there" in line
    assert "ray start --head" in line
    assert not (tmp_path / "r").exists()


def test_a_malformed_ray_address_names_the_forms_it_takes():
    with pytest.raises(ConfigError, match=r"runtime\.address: 'head-node' is not a Ray address"):
        parse_config({"runtime": {"address": "head-node"}})
    for address in ("auto", "10.0.0.5:6379", "ray://head:10001", "[::1]:6379"):
        assert parse_config({"runtime": {"address": address}}).runtime.address == address


# --------------------------------------------------------------------------- nothing lost


def test_a_failed_start_writes_nothing_and_deletes_nothing(tmp_path, capsys):
    """An earlier run and a directory of the user's stay as they were."""
    runs = tmp_path / "runs"
    earlier = runs / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "history.jsonl").write_text("{}\n")
    (runs / "mlflow.db").write_bytes(b"db")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("body,label\nx,a\n")
    for run_dir in (mine, None):
        where = ["--run-dir", str(mine)] if run_dir else ["--set", f"output_dir={runs}"]
        fails(capsys, "run", str(TINY), "--in-process", "--set", "data.source=files",
              "--set", f"data.path={bad_csv}", *where)  # fmt: skip
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in runs.iterdir()) == ["earlier", "mlflow.db"]
    assert (earlier / "history.jsonl").read_text() == "{}\n"
    assert (runs / "mlflow.db").read_bytes() == b"db"  # no MLflow run was opened in it
